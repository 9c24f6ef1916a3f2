"""Where the repository's files are: the presets in configs/ and the SLURM script in scripts/slurm/.

They ship with the repository, not inside the package, so that a fork edits them in place. An
editable install (`make install`, `pip install -e .`) finds them beside the package; any other
install finds them in the folder it runs from, and says in one line where it looked otherwise.
"""

from pathlib import Path

from llm.errors import ConfigError

BESIDE_PACKAGE = Path(__file__).resolve().parents[1]


def repository_file(relative: str) -> Path:
    """`relative` (e.g. "configs/deepspeed") beside the package, else in the working folder."""
    for root in (BESIDE_PACKAGE, Path.cwd()):
        if (root / relative).exists():
            return root / relative
    raise ConfigError(
        f"{relative}: not found beside the package ({BESIDE_PACKAGE}) nor in {Path.cwd()}; run from the "
        "repository's folder, or install it editable (pip install -e <repository>)"
    )


def configs(kind: str) -> Path:
    """The folder of one kind of preset: configs/model, configs/deepspeed, configs/experiment."""
    return repository_file(f"configs/{kind}")


def slurm_script() -> Path:
    return repository_file("scripts/slurm/train.sbatch")
