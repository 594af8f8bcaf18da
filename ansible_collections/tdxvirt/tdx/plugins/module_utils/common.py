# Copyright: tdxvirt developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""What every tdxvirt.tdx module shares: the options choosing the host (uri, sim,
host_root), the tdxvirt session they open, and tdxvirt's one-line failures.

The modules run on the managed host and import the tdxvirt library installed there
(ansible_python_interpreter names the Python that has it). No tdxvirt logic lives
here: each module calls the library functions the tdxvirt command line calls.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import sys

HOST_OPTIONS = dict(
    uri=dict(type="str"),
    sim=dict(type="bool", default=False),
    host_root=dict(type="path"),
)


def _tdxvirt(module):
    try:
        import tdxvirt  # noqa: F401
    except ImportError as error:
        module.fail_json(msg="the tdxvirt library is not importable by %s on the managed host "
                             "(%s); install tdxvirt there and set ansible_python_interpreter to "
                             "the Python that has it" % (sys.executable, error))


def session(module):
    """tdxvirt's session for the module's uri / sim / host_root, as the command line's
    -c / --sim / --host-root open it; remedies in messages carry the same options."""
    _tdxvirt(module)
    from tdxvirt.cli import Session, remedies
    from tdxvirt.virt.conn import is_remote

    uri, sim, host_root = (module.params["uri"], module.params["sim"],
                           module.params["host_root"])
    if host_root is not None and not os.path.isdir(host_root):
        module.fail_json(msg="host_root %s is not a directory; give the directory host facts "
                             "are read below" % host_root)
    if sim:
        from tdxvirt.gpu.privilege import require_root

        try:
            require_root("--sim", "the simulated TDX host, its libvirt daemon and its files "
                         "are root's", euid=os.geteuid, dry_run_hint=False)
        except Exception as error:
            fail(module, error)
    connects = (uri,) if uri else ()
    remedies.remember(sim, connects, host_root, bool(uri) and is_remote(uri))
    return Session(uri, sim, host_root)


def message(error):
    """tdxvirt's one-line error for ``error`` (the line the command line prints after
    "tdxvirt: error: "), or None for an error tdxvirt does not word (a bug)."""
    from tdxvirt.cli import error_line, one_line
    from tdxvirt.cli.remedies import targeted

    line = error_line(error)
    return None if line is None else one_line(targeted(line[0]))


def fail(module, error, **result):
    """End the task with tdxvirt's one line for ``error`` in msg (re-raised when it is
    not one of tdxvirt's, so its traceback shows the bug)."""
    text = message(error)
    if text is None:
        raise error
    module.fail_json(msg=text, **result)


def warnings(module, lines):
    from tdxvirt.cli.remedies import targeted
    from tdxvirt.textsafe import safe

    for line in lines:
        module.warn(safe(targeted(line)))


def execute(module, run, result, diff, diff_result=None):
    """Run ``run(module, session, result, diff)`` on the module's host and end the task:
    tdxvirt's one line in msg on failure, else the result with the diff (in diff mode;
    ``diff_result`` shapes it when the module collects it otherwise than as a dict)."""
    s = session(module)
    try:
        run(module, s, result, diff)
    except Exception as error:
        fail(module, error, **result)
    finally:
        s.close()
    if module._diff and diff:
        result["diff"] = diff_result(diff) if diff_result else diff
    module.exit_json(**result)
