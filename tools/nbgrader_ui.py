"""Switch nbgrader's Jupyter UIs off for learners, or on for instructors, in this Python environment.

    python -m tools.nbgrader_ui off      # what `make setup` does
    python -m tools.nbgrader_ui on       # what `make instructor-ui` does
    python -m tools.nbgrader_ui status   # exit 1 if a learner would see any of them

nbgrader switches its UIs on in every environment it is installed in: four Jupyter server extensions
(formgrader, assignment list, course list, validate) and the JupyterLab / Notebook 7 extension
``@jupyter/nbgrader``, whose plugins add the "Nbgrader" menu, the formgrader, assignment and course
panels, the create-assignment sidebar and the validate button. The plugins are read from the installed
extension itself, so a new nbgrader version's new plugin is not missed; the whole extension is switched
too, which JupyterLab applies to every plugin in it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

LAB_EXTENSION = "@jupyter/nbgrader"
_PLUGIN_ID = re.compile(r"""["'](@jupyter/nbgrader:[A-Za-z0-9_.-]+)["']""")


TOP_LEVEL = "nbgrader"  # nbgrader's own entry point, which loads all of them at once (off unless someone enabled it)


def server_extensions() -> list[str]:
    """The server extensions nbgrader's package switches on (its ``jupyter_server_config.d/nbgrader.json``)."""
    from importlib.metadata import files

    names = set()
    for path in files("nbgrader") or []:
        if path.name == "nbgrader.json" and "jupyter_server_config.d" in path.parts:
            names |= set(json.loads(path.read_text()).get("ServerApp", {}).get("jpserver_extensions", {}))
    if not names:
        raise RuntimeError("nbgrader's jupyter_server_config.d/nbgrader.json is missing: is nbgrader installed here?")
    return sorted(names - {TOP_LEVEL})


def lab_extension_dir(prefix: Path | None = None) -> Path:
    return Path(prefix or sys.prefix) / "share" / "jupyter" / "labextensions" / LAB_EXTENSION


def lab_plugins(prefix: Path | None = None) -> list[str]:
    """Every plugin id the installed ``@jupyter/nbgrader`` JupyterLab extension registers."""
    static = lab_extension_dir(prefix) / "static"
    if not static.is_dir():
        raise FileNotFoundError(f"nbgrader's JupyterLab extension is not installed at {static.parent}")
    found = {m for path in static.glob("*.js") for m in _PLUGIN_ID.findall(path.read_text(errors="replace"))}
    if not found:
        raise RuntimeError(f"No plugin ids found in {static}: nbgrader's bundle changed; update tools/nbgrader_ui.py.")
    return sorted(found)


def page_config(prefix: Path | None = None) -> dict:
    path = Path(prefix or sys.prefix) / "etc" / "jupyter" / "labconfig" / "page_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def plugin_disabled(plugin: str, config: dict) -> bool:
    """JupyterLab's own rule (PageConfig.Extension.isDisabled): the plugin id or its extension's name."""
    disabled = {key for key, value in config.get("disabledExtensions", {}).items() if value}
    return plugin in disabled or plugin.split(":")[0] in disabled


def enabled_server_extensions() -> list[str]:
    """nbgrader's server extensions that ``jupyter server`` would load in this environment."""
    from jupyter_server.extension.config import ExtensionConfigManager
    from jupyter_core.paths import jupyter_config_path

    manager = ExtensionConfigManager(read_config_path=jupyter_config_path())
    enabled = manager.get_jpserver_extensions()
    return [name for name in [TOP_LEVEL, *server_extensions()] if enabled.get(name, False)]


def visible() -> list[str]:
    """What a learner would see: nbgrader's server extensions and lab plugins that are switched on."""
    config = page_config()
    return enabled_server_extensions() + [p for p in lab_plugins() if not plugin_disabled(p, config)]


def switch(on: bool) -> None:
    """What ``jupyter server extension enable|disable --sys-prefix`` and ``jupyter labextension
    enable|disable --level=sys_prefix`` do, for each part, in one process (the commands take seconds each)."""
    from jupyter_server.extension.serverextension import toggle_server_extension_python
    from jupyterlab.commands import disable_extension, enable_extension

    for name in server_extensions():
        toggle_server_extension_python(name, enabled=on, sys_prefix=True)
    for name in [LAB_EXTENSION, *lab_plugins()]:
        (enable_extension if on else disable_extension)(name, level="sys_prefix")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["on", "off", "status"])
    args = parser.parse_args(argv)
    if args.action != "status":
        switch(args.action == "on")
    shown = visible()
    if args.action == "on":
        print(f"nbgrader's Jupyter UIs are on in {sys.prefix} ({len(shown)} parts; `make nbgrader-ui-off` turns them off).")
        return 0
    if shown:
        print(f"nbgrader UI parts still on in {sys.prefix}: {', '.join(shown)}", file=sys.stderr)
        return 1
    print(f"nbgrader's Jupyter UIs are off in {sys.prefix} (`make instructor-ui` turns them on).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
