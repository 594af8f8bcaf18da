"""Every command the docs show is one tdxvirt has: each `tdxvirt ...` in README.md and
docs/*.md (code blocks and inline) names real subcommands and options; and the README's
quick start on the simulated host runs as written (a new user's first hour, issue 26)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from tdxvirt.cli.reference import commands

REPO = Path(__file__).resolve().parent.parent
GLOBAL_WITH_VALUE = ("-c", "--connect", "--host-root", "--host-timeout")


def _doc_commands():
    """(file, command text) of every `tdxvirt ...` the docs show."""
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if path.name == "commands.md":  # generated from the commands themselves
            continue
        text = path.read_text()
        lines = [line for block in re.findall(r"```sh\n(.*?)```", text, re.S)
                 for line in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`(tdxvirt [^`]+)`", text)
        for line in lines:
            line = line.split(" #")[0].split(" -- ")[0]  # after --: another program's words
            # a shell pipe or list ends a command; a '|' between options in [...] does not
            for part in re.split(r"&&|\|\||;|\$\(| \| (?=[a-z])", line):
                if part.strip().startswith("tdxvirt "):
                    yield path.name, part.strip()


def _resolve(found: dict, words: list[str]) -> str:
    key, skip = "tdxvirt", False
    for word in words:
        if skip:
            skip = False
            continue
        if word.strip("[]") in GLOBAL_WITH_VALUE:
            skip = True
            continue
        if word.startswith(("-", "[")):
            continue
        if f"{key} {word}" not in found:
            break
        key = f"{key} {word}"
    return key


def test_every_documented_command_and_option_exists():
    found = {" ".join(path): command for path, command, _ in commands()}
    everywhere = {o for p in found["tdxvirt"].params for o in getattr(p, "opts", [])}
    wrong = []
    for name, text in _doc_commands():
        key = _resolve(found, text.split()[1:])
        known = everywhere | {o for p in found[key].params for o in getattr(p, "opts", [])}
        used = set(re.findall(r"(?<![\w/-])(--?[a-zA-Z][\w-]*)", text))
        if unknown := used - known - {"--help", "-h"}:
            wrong.append((name, text, key, sorted(unknown)))
    assert wrong == []
    assert sum(1 for _ in _doc_commands()) > 100  # the walk found the docs' commands


def _quick_start() -> list[str]:
    """The README's quick start on the simulated host, one command per item."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Try it without hardware", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip()]


def test_the_readme_quick_start_runs_as_written_on_the_simulated_host(sim, qemu_conn, cc_on):
    """Word for word, but for the TD's name and the image's directory (tests run beside
    each other): each command exits 0, but for the two the README says report failures
    here (host check before host setup, guest verify under TCG). cc_on: the GPU's CC
    mode the quick start sets is put back as it was afterwards."""
    name, directory = f"qs-{uuid.uuid4().hex[:6]}", f"/tmp/tdxvirt-qs-{uuid.uuid4().hex[:6]}"
    home = Path(tempfile.mkdtemp(prefix="tdxvirt-qs-home-"))  # the user's ~/.ssh, fresh
    (home / ".ssh").mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(home / ".ssh/id_ed25519")], check=True)
    env = {**os.environ, "HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    commands_run = _quick_start()
    assert any("sim guest-image" in c for c in commands_run) and any(" start td1" in c for c in commands_run)
    allowed = {"host check": {0, 1}, "guest verify": {1}}
    assignments = []  # `uri=$(...)`: a later line uses what an earlier one set
    try:
        for command in commands_run:
            command = re.sub(r"\btd1\b", name, command).replace("/tmp/td", directory)
            # ssh finds ~/.ssh through the password database, not $HOME: the test's key
            # is named (the user's own ~/.ssh is never touched)
            command = command.replace(" ssh ", f" ssh -i {home}/.ssh/id_ed25519 ")
            done = subprocess.run(["bash", "-c", "\n".join([*assignments, command])],
                                  capture_output=True, text=True, env=env, timeout=600)
            expected = next((codes for words, codes in allowed.items() if words in command), {0})
            assert done.returncode in expected, (command, done.returncode, done.stdout[-800:],
                                                 done.stderr[-800:])
            if re.match(r"[a-z]+=", command):
                assignments.append(command)
            if " ssh " in command:  # logged in over the simulated host's network, with the key
                assert done.stdout.startswith("Linux ") and "6." in done.stdout, done.stdout
    finally:
        tdxvirt = str(Path(sys.executable).parent / "tdxvirt")
        subprocess.run([tdxvirt, "--sim", "destroy", name], capture_output=True, env=env)
        subprocess.run([tdxvirt, "--sim", "undefine", name, "--remove-storage"],
                       capture_output=True, env=env)
        subprocess.run(["rm", "-rf", directory, str(home)])
    assert name not in qemu_conn.listDefinedDomains()
