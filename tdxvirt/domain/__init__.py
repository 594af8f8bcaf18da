"""The TD as a libvirt domain: what the user asked (spec), every decision (policy), the
XML written (render, the templates in domains/) and read (domainxml), TDX's rules
(td_rules, integrity), its measurements (tdvf, bootmeasure, measure), and which of its
files tdxvirt may delete (storage_paths). Nothing here changes a host."""
