"""Drive Debian's virt-manager through its accessibility tree, as a user's clicks would.

Run by the tests with the system's python3 (dogtail and virt-manager are Debian
packages, not the venv's) inside a D-Bus session on an Xvfb display:

    python3 virt_manager_gui.py URI STEPS_JSON

STEPS_JSON is a list of steps, each ``[action, vm, *args]``:
``row`` (the VM's line in the main list), ``run`` (select, press the toolbar's Run;
an optional answer to virt-manager's question after a failed restore),
``save`` (Shut Down menu > Save, confirmed), ``clone`` (Clone... with the dialog's defaults).
It prints one JSON list: for each step the error dialog's summary and details (None
when there was none) and the VM's row afterwards. The same way virt-manager's own UI tests drive it
(virt-manager/virt-manager tests/uitests/lib/app.py), written for this suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import dogtail.config

dogtail.config.config.searchShowingOnly = True
dogtail.config.config.logDebugToFile = False
dogtail.config.config.logDebugToStdOut = False
dogtail.config.config.searchCutoffCount = 40
import dogtail.rawinput  # noqa: E402
import dogtail.tree  # noqa: E402
import pyatspi  # noqa: E402

WAIT = 60.0  # seconds a step may take (TCG start of a TD on 2 cores)


def until(what, seconds: float = WAIT):
    """what() once it is truthy (polling), or raise naming how long it waited."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            found = what()
        except Exception:  # the tree changes under us while windows open and close
            found = None
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"nothing after {seconds:.0f} s")


class VirtManager:
    def __init__(self, uri: str):
        self.process = subprocess.Popen(
            ["virt-manager", "--no-fork", "--connect", uri, "--test-options=first-run"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.app = until(lambda: dogtail.tree.root.application("virt-manager"))
        self.manager = until(lambda: self.app.child("Virtual Machine Manager", "frame",
                                                    retry=False))

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def cell(self, vm: str):
        """The VM's cell in the main list: "TITLE-or-NAME\\nState"."""
        def found():
            for cell in self.manager.findChildren(lambda n: n.roleName == "table cell"):
                if "\n" in cell.name and cell.name.split("\n")[0].split(" ")[0] == vm:
                    return cell
            return None
        return until(found)

    def row(self, vm: str) -> str:
        return self.cell(vm).name

    def _select(self, vm: str):
        cell = self.cell(vm)
        cell.click()
        until(lambda: cell.getState().contains(pyatspi.STATE_SELECTED))
        return cell

    def _alert(self, seconds: float):
        """The alert virt-manager opens (error or question), or None."""
        try:
            return until(lambda: self.app.child(roleName="alert", retry=False), seconds)
        except TimeoutError:
            return None

    def _error_text(self, seconds: float, answer: str = "No") -> dict | None:
        """The error dialog's text, closed (a question, such as "remove the saved state
        and start afresh?", gets ``answer``); None when no dialog came."""
        alert = self._alert(seconds)
        if alert is None:
            return None
        labels = [n.name for n in alert.findChildren(lambda n: n.roleName == "label") if n.name]
        # the Details expander's text view holds the whole message, even while folded
        texts = [n.text for n in alert.findChildren(lambda n: n.roleName == "text",
                                                    showingOnly=False) if n.text]
        buttons = {n.name: n for n in alert.findChildren(lambda n: n.roleName == "push button")}
        pressed = "Close" if "Close" in buttons else answer
        buttons[pressed].doActionNamed("click")
        until(lambda: not alert.showing)
        return {"summary": "\n".join(labels), "details": "\n".join(texts), "pressed": pressed}

    def run(self, vm: str, answer: str = "No") -> dict | None:
        self._select(vm)
        # The toolbar's Run button is labelled Restore for a VM with a saved state.
        button = until(lambda: self.manager.findChild(
            lambda n: n.roleName == "push button" and n.name in ("Run", "Restore")
            and n.sensitive, retry=False))
        button.doActionNamed("click")
        # Either the row says Running or an error dialog opens.
        until(lambda: "Running" in self.row(vm) or self._alert(0.1))
        error = self._error_text(1, answer)
        if error and error["pressed"] == "Yes":  # virt-manager then starts it afresh
            until(lambda: "Running" in self.row(vm) or self._alert(0.1))
            error["then"] = self._error_text(1)
        return error

    def save(self, vm: str) -> dict | None:
        cell = self._select(vm)
        cell.click(button=3)
        menu = until(lambda: self.app.child("vm-action-menu", retry=False))
        shutdown = menu.child("Shut Down", "menu")
        shutdown.point()
        until(lambda: shutdown.child("Save", "menu item", retry=False).showing)
        shutdown.child("Save", "menu item").click()
        question = self._alert(10)
        if question is not None and question.child("Yes", "push button", retry=False):
            question.child("Yes", "push button").doActionNamed("click")
        until(lambda: "Shutoff" in self.row(vm) or "Saved" in self.row(vm)
              or self._alert(0.1))
        return self._error_text(1)

    def clone(self, vm: str) -> dict | None:
        """Clone... with the dialog's defaults: the copy is named VM-clone."""
        cell = self._select(vm)
        cell.click(button=3)
        menu = until(lambda: self.app.child("vm-action-menu", retry=False))
        menu.child("Clone...", "menu item").click()
        window = until(lambda: self.app.child("Clone Virtual Machine", "frame", retry=False))
        window.child("Clone", "push button").doActionNamed("click")
        until(lambda: not window.showing or self._alert(0.1))
        error = self._error_text(1)
        if error is None:
            self.cell(f"{vm}-clone")
        return error


def main() -> None:
    uri, steps = sys.argv[1], json.loads(sys.argv[2])
    gui = VirtManager(uri)
    results = []
    try:
        for action, vm, *args in steps:
            error = None if action == "row" else getattr(gui, action)(vm, *args)
            shown = f"{vm}-clone" if action == "clone" and error is None else vm
            results.append({"step": action, "error": error, "row": gui.row(shown)})
    except Exception as failed:  # the test prints what the GUI did not do
        results.append({"step": action, "failed": f"{type(failed).__name__}: {failed}"})
    finally:
        gui.close()
        print(json.dumps(results))


if __name__ == "__main__":
    main()
