"""Packaging and extension points, each exercised in a separate interpreter.

* the wheel ships the presets and the recipe zoo, and an installed (non-editable) wheel runs ``fit --smoke`` from an
  empty directory;
* a module and a preset added to a source checkout register by presence, with no other edit;
* a plugin registers through the ``mllm_kit.components`` entry-point group; a ``MLLM_KIT_PRESETS`` folder adds presets.

Nothing is installed into the current virtualenv: the wheel goes into a fresh venv, the plugin into a ``--target`` folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TIMEOUT = 600  # seconds per subprocess: a 2-core machine imports torch + transformers + lightning in 5-10 s
FIT_TIMEOUT = 900
RESULT = "RESULT:"  # prefix of the JSON line a subprocess script prints


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An offline environment with a fresh tiny-model cache and none of the caller's Python path settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MLLM_KIT_PRESETS", "VIRTUAL_ENV")}
    cache = tmp_path / "mllm_kit_cache"
    cache.mkdir(exist_ok=True)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MLLM_KIT_CACHE=str(cache),
               COLUMNS="400", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def _run(cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: int = TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"command failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n(cwd {cwd})\n"
                    f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-12000:]}", pytrace=False)
    return proc


def _script(code: str, *args: object, env: dict[str, str], cwd: Path, python: str | Path = PYTHON) -> dict:
    """Run ``code`` in a fresh interpreter; it prints ``RESULT: {json}`` as its last result line, returned here."""
    proc = _run([python, "-c", textwrap.dedent(code), *args], env=env, cwd=cwd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, f"no result line in the script's output\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr[-12000:]}"
    return json.loads(lines[-1][len(RESULT):])


def _inside(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


# -- the wheel ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_installed_wheel_ships_the_zoo_and_runs_a_smoke_fit(tmp_path):
    # Build the wheel from the working tree (hatchling comes from the dev extra: no build isolation, no network).
    dist = tmp_path / "dist"
    _run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, REPO], env=_env(tmp_path), cwd=tmp_path)
    wheels = list(dist.glob("mllm_kit-*.whl"))
    assert len(wheels) == 1, wheels
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    expected = {"mllm_kit/presets/recipes/quickstart.yaml", "mllm_kit/presets/recipes/llava15.yaml",
                *(f"mllm_kit/presets/connectors/{p.name}" for p in (REPO / "connectors").glob("*.yaml")),
                *(f"mllm_kit/presets/encoders/{p.name}" for p in (REPO / "encoders").glob("*.yaml")),
                *(f"mllm_kit/presets/llms/{p.name}" for p in (REPO / "llms").glob("*.yaml")),
                *(f"mllm_kit/presets/recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml"))}
    assert "mllm_kit/presets/connectors/mlp2x_gelu.yaml" in expected
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]

    # A fresh venv; pip (of this venv) installs the wheel into it, non-editable and without dependencies, *before* the
    # fresh venv can see this venv's packages, so pip sees no other mllm-kit there.
    venv = tmp_path / "venv"
    _run([PYTHON, "-m", "venv", "--without-pip", venv], env=_env(tmp_path), cwd=tmp_path)
    fresh_python = venv / "bin" / "python"
    _run([PYTHON, "-m", "pip", "--python", fresh_python, "install", "--no-deps", "--no-index", wheels[0]],
         env=_env(tmp_path), cwd=tmp_path)
    fresh_site = Path(_run([fresh_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           env=_env(tmp_path), cwd=tmp_path).stdout.strip())
    assert _inside(fresh_site, venv)
    assert (fresh_site / "mllm_kit" / "__init__.py").is_file()
    # Then torch & co. come from this venv's site-packages through a path line (which does not process the .pth files in
    # that folder, so this venv's editable install of mllm-kit does not leak in).
    own_site = sysconfig.get_paths()["purelib"]
    (fresh_site / "_parent_venv.pth").write_text(f"{own_site}\n")

    work = tmp_path / "work"  # an empty working directory, not the repository
    work.mkdir()
    env = _env(tmp_path, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    found = _script(
        """
        import json, sys, mllm_kit, torch
        print("RESULT:" + json.dumps({"file": mllm_kit.__file__, "path": sys.path, "torch": torch.__file__}))
        """, env=env, cwd=work, python=fresh_python)
    assert _inside(found["file"], venv), f"mllm_kit imported from {found['file']}, not from the fresh venv {venv}"
    assert _inside(found["torch"], Path(own_site)), found["torch"]
    assert not [p for p in found["path"] if p and _inside(p, REPO) and not _inside(p, REPO / ".venv")], (
        f"the repository leaked into the fresh venv's sys.path: {found['path']}")

    cli = shutil.which("mllm-kit", path=env["PATH"])
    assert cli is not None and _inside(cli, venv), cli
    recipes = _run([cli, "recipes"], env=env, cwd=work)
    assert "quickstart" in recipes.stdout and "llava15" in recipes.stdout, recipes.stdout

    _run([cli, "fit", "--recipe", "quickstart", "--smoke", "--no-eval", "--run-dir", "run", "trainer.progress=false"],
         env=env, cwd=work, timeout=FIT_TIMEOUT)
    state = json.loads((work / "run" / "state.json").read_text())["stages"]
    stages = _script(
        """
        import json, sys
        from omegaconf import OmegaConf
        print("RESULT:" + json.dumps([s["name"] for s in OmegaConf.load(sys.argv[1]).stages]))
        """, work / "run" / "recipe.yaml", env=env, cwd=work, python=fresh_python)
    assert stages == ["align", "sft"], stages
    assert {name: state.get(name, {}).get("status") for name in stages} == dict.fromkeys(stages, "done"), state
    assert sorted(p.name for p in work.iterdir()) == ["run"], "the run wrote outside its run directory"


# -- register by presence -------------------------------------------------------------------------------------------

SCALED_MLP = '''
"""An MLP connector whose output tokens are scaled by a constant."""

from __future__ import annotations

from mllm_kit.connectors.base import ConnectorOutput
from mllm_kit.connectors.mlp import MLPConnector
from mllm_kit.registry import register_connector


@register_connector("scaled_mlp")
class ScaledMLPConnector(MLPConnector):
    def __init__(self, in_dims, out_dim, depth: int = 2, act: str = "gelu", bias: bool = True, scale: float = 1.0) -> None:
        super().__init__(in_dims, out_dim, depth=depth, act=act, bias=bias)
        self.scale = float(scale)

    def forward(self, features, text_context=None) -> ConnectorOutput:
        out = super().forward(features, text_context)
        return ConnectorOutput(tokens=out.tokens * self.scale, aux_losses=out.aux_losses, steps=out.steps)
'''


def _source_copy(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    for folder in ("mllm_kit", "encoders", "connectors", "llms", "recipes"):
        shutil.copytree(REPO / folder, dest / folder, ignore=ignore)
    return dest


@pytest.mark.slow  # ~15 s on 2 cores: the subprocess imports torch/transformers and builds tiny models
def test_a_module_and_a_preset_dropped_into_a_checkout_register_by_presence(tmp_path):
    root = _source_copy(tmp_path / "checkout")
    (root / "mllm_kit" / "connectors" / "scaled_mlp.py").write_text(SCALED_MLP)
    (root / "connectors" / "scaled_mlp_x2.yaml").write_text("name: scaled_mlp\ndepth: 2\nscale: 2.0\n")

    result = _script(
        """
        import json, sys
        import torch
        import mllm_kit
        from mllm_kit.config import load_recipe, smoke_recipe
        from mllm_kit.errors import ConfigError
        from mllm_kit.registry import CONNECTORS
        from mllm_kit.training.stage import build_recipe_model

        recipe = smoke_recipe(load_recipe("quickstart", ["model.connector=scaled_mlp_x2"]))
        model = build_recipe_model(recipe)
        conn = model.connector
        x = torch.randn(1, 3, conn.in_dims[0])
        try:
            load_recipe("quickstart", ["model.connector=scaled_mlp_x3"])
            error = None
        except ConfigError as err:
            error = str(err)
        print("RESULT:" + json.dumps({
            "file": mllm_kit.__file__, "spec": recipe.model.connector, "cls": type(conn).__module__ + "." + type(conn).__qualname__,
            "scale": getattr(conn, "scale", None), "depth": getattr(conn, "depth", None), "origin": CONNECTORS.origin("scaled_mlp"),
            "scaled": bool(torch.allclose(conn(features=[type("F", (), {"selected": x})()]).tokens, 2.0 * conn.mlp(x))),
            "error": error,
        }))
        """, env=_env(tmp_path, PYTHONPATH=str(root)), cwd=root)

    assert _inside(result["file"], root), f"mllm_kit came from {result['file']}, not from the copy {root}"
    assert result["spec"]["name"] == "scaled_mlp" and result["spec"]["scale"] == 2.0, result["spec"]
    assert result["cls"] == "mllm_kit.connectors.scaled_mlp.ScaledMLPConnector", result["cls"]
    assert result["origin"] == "mllm_kit.connectors.scaled_mlp"
    assert result["scale"] == 2.0 and result["depth"] == 2
    assert result["scaled"], "the connector's output is not 2x its MLP's"
    assert result["error"] is not None, "model.connector=scaled_mlp_x3 loaded; expected ConfigError"
    assert "Did you mean 'scaled_mlp_x2'" in result["error"], result["error"]


# -- plugins ------------------------------------------------------------------------------------------------------

PLUGIN_PYPROJECT = """
[build-system]
requires = ["hatchling>=1.24"]
build-backend = "hatchling.build"

[project]
name = "tinyplug"
version = "0.0.1"
requires-python = ">=3.10"

[project.entry-points."mllm_kit.components"]
tinyplug = "tinyplug.components"

[tool.hatch.build.targets.wheel]
packages = ["tinyplug"]
"""

PLUGIN_COMPONENTS = '''
"""tinyplug's components: imported by mllm-kit through its entry point."""

from mllm_kit.connectors.mlp import MLPConnector
from mllm_kit.registry import register_connector


@register_connector("plug_mlp")
class PlugMLPConnector(MLPConnector):
    """LLaVA's MLP, registered by a plugin."""
'''


@pytest.fixture(scope="module")
def plugin_target(tmp_path_factory) -> Path:
    """``tinyplug`` installed with pip into a ``--target`` folder (not into this venv): put it on PYTHONPATH to use it."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "tinyplug-src"
    (src / "tinyplug").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (src / "tinyplug" / "__init__.py").write_text("")
    (src / "tinyplug" / "components.py").write_text(PLUGIN_COMPONENTS)
    target = tmp / "target"
    _run([PYTHON, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--target", target, src],
         env=_env(tmp), cwd=tmp)
    assert (target / "tinyplug" / "components.py").is_file()
    assert list(target.glob("tinyplug-*.dist-info/entry_points.txt"))
    return target


@pytest.mark.slow
def test_a_plugin_registers_through_its_entry_point(plugin_target, tmp_path):
    env = _env(tmp_path, PYTHONPATH=str(plugin_target))
    listing = _run([PYTHON, "-m", "mllm_kit.cli", "components"], env=env, cwd=tmp_path)
    rows = [line for line in listing.stdout.splitlines() if "plug_mlp" in line]
    assert rows, f"plug_mlp is not listed by `mllm-kit components`:\n{listing.stdout}"
    assert any("plugin tinyplug" in row and "connectors" in row for row in rows), rows

    result = _script(
        """
        import json
        from mllm_kit.config import resolve_component
        from mllm_kit.model import MLLM
        from mllm_kit.registry import CONNECTORS
        from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec

        spec = resolve_component("connectors", {"name": "plug_mlp"})
        model = MLLM.build(tiny_encoder_spec("clip"), spec, tiny_llm_spec("llama"))
        by_name = MLLM.build(tiny_encoder_spec("clip"), "plug_mlp", tiny_llm_spec("llama"))
        cls = lambda m: type(m.connector).__module__ + "." + type(m.connector).__qualname__
        print("RESULT:" + json.dumps({"spec": spec, "cls": cls(model), "by_name": cls(by_name),
                                      "origin": CONNECTORS.origin("plug_mlp")}))
        """, env=env, cwd=tmp_path)
    assert result["spec"]["name"] == "plug_mlp", result["spec"]
    assert result["cls"] == result["by_name"] == "tinyplug.components.PlugMLPConnector", result
    assert result["origin"].startswith("plugin tinyplug") and "tinyplug.components" in result["origin"], result["origin"]


@pytest.mark.slow
def test_a_presets_folder_adds_presets(plugin_target, tmp_path):
    presets = tmp_path / "my_presets"
    (presets / "connectors").mkdir(parents=True)
    (presets / "connectors" / "plug_preset.yaml").write_text("name: plug_mlp\n")
    env = _env(tmp_path, PYTHONPATH=str(plugin_target), MLLM_KIT_PRESETS=str(presets))
    result = _script(
        """
        import json
        from mllm_kit.config import resolve_component
        from mllm_kit.config.presets import list_presets, preset_path

        spec = resolve_component("connectors", "plug_preset")
        print("RESULT:" + json.dumps({"spec": spec, "listed": "plug_preset" in list_presets("connectors"),
                                      "path": str(preset_path("connectors", "plug_preset"))}))
        """, env=env, cwd=tmp_path)
    assert result["spec"] == {"name": "plug_mlp"}, result["spec"]
    assert result["listed"]
    assert _inside(result["path"], presets), result["path"]
