"""Saved hybrids load where mambaify is installed but not imported (``trust_remote_code=True``).

``import mambaify`` registers the hybrid with transformers' Auto classes, which is all that
``AutoModelForCausalLM.from_pretrained`` needs in the user's own code. Tools that load a model
by its path in their own process (lm-eval's ``hf`` model, a serving script) never import
mambaify. For them every saved hybrid carries an ``auto_map`` and two one-line modules that
import the classes from the installed package, so that ``trust_remote_code=True`` finds them;
where mambaify is missing, transformers says which package to install. The code stays in the
package, so a checkpoint never carries a stale copy of it.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_MODULE = "configuration_mambaify"
MODELING_MODULE = "modeling_mambaify"
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_MODULE}.HybridConfig",
    "AutoModel": f"{MODELING_MODULE}.HybridModel",
    "AutoModelForCausalLM": f"{MODELING_MODULE}.HybridForCausalLM",
}
_MODULES = {
    CONFIG_MODULE: "from mambaify.models.configuration import HybridConfig\n",
    MODELING_MODULE: "from mambaify.models.modeling import HybridForCausalLM, HybridModel\n",
}
_HEADER = ('"""Loads a mambaify hybrid with trust_remote_code=True: the classes come from the installed '
           'mambaify package (pip install mambaify)."""\n\n')


def write_remote_code(save_directory: str | Path) -> None:
    """Write the modules that :data:`AUTO_MAP` names into ``save_directory``."""
    for name, body in _MODULES.items():
        (Path(save_directory) / f"{name}.py").write_text(_HEADER + body)
