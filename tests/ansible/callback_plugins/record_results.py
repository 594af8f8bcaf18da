"""An Ansible callback for tdxvirt's tests: every task result, one JSON line each, in the
file $TDXVIRT_ANSIBLE_RECORD (ansible-core 2.19 ships no json stdout callback)."""

from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: record_results
type: aggregate
short_description: each task's result as a JSON line (tdxvirt's tests)
description: Writes every task's result to the file named by TDXVIRT_ANSIBLE_RECORD.
requirements: [enable in configuration]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "record_results"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, result, status):
        path = os.environ.get("TDXVIRT_ANSIBLE_RECORD")
        if not path:
            return
        data = dict(result._result)
        data.pop("invocation", None)
        line = {"task": result._task.get_name(), "status": status, "result": data}
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(line, default=str) + "\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")
