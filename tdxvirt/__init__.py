"""tdxvirt: Intel TDX trust domains with NVIDIA GPUs, through libvirt."""

__version__ = "0.1.0"
