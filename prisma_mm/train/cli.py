"""``prisma-mm train {fit,validate} --config trainers/<recipe>.yaml``: LightningCLI over
:class:`~prisma_mm.train.module.SAEModule` and :class:`~prisma_mm.train.data.ActivationDataModule`.

What this adds to a plain LightningCLI:

- the dictionary's ``d_in`` is linked from the data (``data.d_in``), so a recipe never repeats it;
- every :class:`~prisma_mm.sae.base.Dictionary` family takes its config fields as ``init_args``
  (each family's ``__init__`` carries them as its signature from class creation);
- a run directory ``<trainer.default_root_dir>/<run_name>/version_<n>`` (run_name defaults to the
  recipe's file name) shared by the default CSV and TensorBoard loggers, the checkpoints, the
  saved config and the final dictionary;
- ``--config NAME`` also finds a recipe shipped in ``trainers/`` by name.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from prisma_mm.errors import PrismaError, unknown
from prisma_mm.train.data import ActivationDataModule

__all__ = [
    "TrainCLI",
    "list_recipes",
    "recipe_dirs",
    "resolve_recipe",
    "run_train_cli",
    "train_cli",
]

DEFAULT_MODEL = "prisma_mm.train.module.SAEModule"
DEFAULT_DATA = "prisma_mm.train.data.ActivationDataModule"
DEFAULT_LOGGERS = (
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
)


# ---- recipes ------------------------------------------------------------------------------
def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: ``trainers/`` of a source checkout, then of the wheel."""
    package = Path(__file__).resolve().parents[1]
    return [d for d in (package.parent / "trainers", package / "trainers") if d.is_dir()]


def list_recipes() -> list[str]:
    """Names (file stems) of the shipped recipes."""
    return sorted({p.stem for d in recipe_dirs() for p in d.glob("*.yaml")})


def resolve_recipe(name: str) -> str:
    """A recipe path: ``name`` itself if it is a file, else the shipped recipe of that name."""
    if Path(name).is_file():
        return name
    stem = Path(name).name.removesuffix(".yaml")
    for directory in recipe_dirs():
        candidate = directory / f"{stem}.yaml"
        if candidate.is_file():
            return str(candidate)
    raise unknown("recipe", name, list_recipes(), hint=" (not a file, nor a recipe in trainers/)")


def _resolve_config_args(argv: list[str]) -> list[str]:
    out: list[str] = []
    expect_config = False
    for arg in argv:
        if expect_config:
            out.append(resolve_recipe(arg))
            expect_config = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            expect_config = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_recipe(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


# ---- run directory ------------------------------------------------------------------------
def _next_version(root: Path) -> str:
    numbers = [
        int(m.group(1))
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := re.fullmatch(r"version_(\d+)", p.name))
    ]
    return f"version_{max(numbers) + 1 if numbers else 0}"


def _logger_entries(logger: Any) -> list[Any]:
    if isinstance(logger, Namespace):
        return [logger]
    if isinstance(logger, list):
        return [entry for entry in logger if isinstance(entry, Namespace)]
    return []


class TrainParser(LightningArgumentParser):
    """LightningCLI's parser with its error message on one line (jsonargparse indents the
    causes of a bad value on lines of their own), after the usage as argparse prints it."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(_subclass_error(message), ex)


_UNION_ERROR = re.compile(
    r"Errors:\s*- (?:Problem with given class_path '[^']*':\s*)?"
    r"(?:Parser key \"(?P<key>[^\"]+)\":\s*)?(?P<message>.*?)\s*- Expected a <class 'NoneType'>",
    re.S,
)


def _subclass_error(message: str) -> str:
    """jsonargparse's error about a value of the ``model`` / ``data`` class in one line,
    naming it by its dotted key (``model.lr_decay: ...``) rather than listing every type the
    class argument accepts (the class itself, or None)."""
    message = str(message)
    found = _UNION_ERROR.search(message)
    if found is not None and "Does not validate against any of the Union subtypes" in message:
        outer = re.search(r'Parser key "([^"]+)":\s*Does not validate', message)
        key = ".".join(k for k in (outer and outer.group(1), found.group("key")) if k)
        message = f"{key}: {found.group('message')}" if key else found.group("message")
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


class TrainCLI(LightningCLI):
    """LightningCLI for dictionary training (subcommands ``fit`` and ``validate``)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="run directory <trainer.default_root_dir>/<run_name>/version_<n> "
            "(default: the recipe's file name, else 'sae')",
        )
        # a recipe names its classes only to leave the defaults (train from a cache: SAEModule
        # + ActivationDataModule): `data: {class_path: ...ModelActivationDataModule}` trains
        # straight from a model, `model: {class_path: ...MultiSAEModule}` several dictionaries
        # (both modules take a `dictionary` whose d_in is the data's)
        parser.set_defaults(
            {"model": {"class_path": DEFAULT_MODEL}, "data": {"class_path": DEFAULT_DATA}}
        )
        parser.link_arguments(
            "data.d_in", "model.init_args.dictionary.init_args.d_in", apply_on="instantiate"
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the checkpoint's hyper-parameters right after parsing: check first
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt is not None:
            check_checkpoint(str(ckpt))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_config(config)
        _fill_sources(config)
        _share_run_dir(config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except MisconfigurationException as error:  # Lightning's own checks, in one line
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise PrismaError(f"trainer: {first}") from None
        except ValueError as error:  # a model or data class refused its arguments
            if "Does not validate against any of the Union subtypes" not in str(error):
                raise
            raise PrismaError(_subclass_error(str(error))) from None


def check_config(config: Namespace) -> None:
    """One-line errors for a run that cannot work, before anything is built: devices, the data
    loader's workers, the run directory, the cache and its hooks, the dictionary's config.
    (The checkpoint is checked earlier, by :meth:`TrainCLI.parse_arguments`.)"""
    data_args = _init_args(config, "data")
    workers = data_args.get("num_workers")
    if workers is not None and int(workers) < 0:
        raise PrismaError(
            f"data.num_workers must be 0 or more, got {workers} (0 reads in the main process)"
        )
    accelerator = config.get("trainer.accelerator")
    if isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PrismaError(
                f"trainer.accelerator={accelerator!r} but torch sees no CUDA GPU on this "
                "machine: use --trainer.accelerator cpu (or auto)"
            )
    root = config.get("trainer.default_root_dir")
    if root and Path(str(root)).exists() and not Path(str(root)).is_dir():
        raise PrismaError(
            f"trainer.default_root_dir {str(root)!r} is a file: give a directory for the runs"
        )
    if config.get("weights_only") is False:
        raise PrismaError(
            "weights_only=False would unpickle code from the checkpoint: checkpoints of "
            "prisma-mm train load with weights_only=True; drop the option"
        )
    if "weights_only" in config:
        config.weights_only = True  # never torch's or an environment variable's default
    processes = _process_count(config.get("trainer.devices"), config.get("trainer.num_nodes"))
    batch_size = data_args.get("batch_size")
    if processes and isinstance(batch_size, int) and batch_size > 0 and batch_size % processes:
        raise PrismaError(
            f"data.batch_size {batch_size} is not divisible by the {processes} training "
            "processes (trainer.devices x trainer.num_nodes); make it a multiple so every step "
            "trains on the same rows"
        )
    members = _init_args(config, "model").get("members")
    if isinstance(members, dict):  # MultiSAEModule: its members' hooks are the data's
        from prisma_mm.train.multi import check_member_hooks

        check_member_hooks(
            {k: v.as_dict() if isinstance(v, Namespace) else v for k, v in members.items()},
            data_args.get("hooks"),
        )
    if _named_class(config.get("data.class_path")) is ActivationDataModule:
        # the cache, its hooks and the data arguments, read from the manifest alone
        check_data_and_dictionary(ActivationDataModule(**data_args.as_dict()), config)


def _named_class(class_path: Any) -> Any:
    """The class a config's ``class_path`` names (None when it names none)."""
    module_name, _, class_name = str(class_path or DEFAULT_DATA).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        return None


def _init_args(config: Namespace, group: str) -> Namespace:
    """The ``init_args`` of the ``model`` or ``data`` class of a parsed config."""
    args = config.get(f"{group}.init_args")
    return args if isinstance(args, Namespace) else Namespace()


def _process_count(devices: Any, num_nodes: Any) -> int | None:
    """Training processes a ``trainer.devices`` / ``num_nodes`` pair asks for, when it says
    (an int, a digit string or a device list; None for ``auto`` and ``-1``)."""
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices <= 0:
        return None
    return devices * (int(num_nodes) if isinstance(num_nodes, int) and num_nodes > 0 else 1)


def check_data_and_dictionary(datamodule: ActivationDataModule, config: Namespace) -> None:
    """The cache exists and holds the hooks; a ``d_in`` given in the recipe or on the command
    line equals the cache's width; the dictionary's config is valid at that width (its own
    checks, e.g. ``k``, without allocating weights)."""
    width = datamodule.d_in
    spec = _init_args(config, "model").get("dictionary")
    if not isinstance(spec, Namespace) or spec.get("init_args") is None:
        return
    init_args = spec.init_args.as_dict()
    requested = init_args.get("d_in")
    if requested is not None and int(requested) != width:
        raise PrismaError(
            f"model.dictionary.init_args.d_in={requested} disagrees with the cache: "
            f"{datamodule.hooks[0]!r} has width {width}; drop d_in (it comes from the data)"
        )
    module_name, _, class_name = str(spec.get("class_path", "")).rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    config_class = getattr(cls, "config_class", None)
    if dataclasses.is_dataclass(config_class):
        if "n_sources" in init_args:
            init_args["n_sources"] = datamodule.n_sources
        names = {f.name for f in dataclasses.fields(config_class) if f.init}
        config_class(**{**{k: v for k, v in init_args.items() if k in names}, "d_in": width})


def check_checkpoint(path: str) -> None:
    """A one-line PrismaError unless ``path`` is a training checkpoint that loads without
    unpickling code (``torch.load(weights_only=True)``; memory-mapped, so it costs little).
    Lightning's own names (``last``, ``best``, ``hpc``, ``registry...``) are left to it."""
    import pickle

    import torch

    if path in ("last", "best", "hpc") or path.startswith("registry"):
        return
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise PrismaError(
            f"ckpt_path {path!r} {what}: give a checkpoint file written by prisma-mm train "
            "(<run dir>/checkpoints/last.ckpt)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise PrismaError(
            f"ckpt_path {path!r} holds Python objects beyond tensors and plain data (code "
            "would run on loading): refused; give a checkpoint written by prisma-mm train"
        ) from None
    except Exception as error:  # zip, pickle and format errors of a file that is no checkpoint
        raise PrismaError(
            f"ckpt_path {path!r} is not a PyTorch checkpoint ({type(error).__name__}): give "
            "a .ckpt file written by prisma-mm train"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise PrismaError(
            f"ckpt_path {path!r} is not a Lightning training checkpoint (no state_dict): give "
            "a .ckpt file written by prisma-mm train"
        )


def _fill_sources(config: Namespace) -> None:
    """A crosscoder's ``n_sources`` is the number of hooks the data reads."""
    dictionary = _init_args(config, "model").get("dictionary")
    hooks = _init_args(config, "data").get("hooks")
    if not isinstance(dictionary, Namespace) or dictionary.get("init_args") is None:
        return
    if "n_sources" in dictionary.init_args and hooks is not None:
        dictionary.init_args.n_sources = 1 if isinstance(hooks, str) else len(hooks)


def _share_run_dir(config: Namespace) -> None:
    """Point the loggers at one run directory ``<default_root_dir>/<run_name>/version_<n>``."""
    trainer = config.trainer
    root = Path(trainer.default_root_dir or "runs")
    name = config.get("run_name")
    if not name:
        recipes = config.get("config") or []
        name = Path(str(recipes[-1])).stem if recipes else "sae"
    if trainer.logger in (None, True):
        version = _next_version(root / name)
        trainer.logger = [
            Namespace(
                class_path=path, init_args=Namespace(save_dir=str(root), name=name, version=version)
            )
            for path in DEFAULT_LOGGERS
        ]
        return
    # loggers given in the recipe: those without a version share one directory per name
    versions: dict[tuple[str, str], str] = {}
    for entry in _logger_entries(trainer.logger):
        args = entry.get("init_args")
        if args is None or args.get("version") is not None or args.get("save_dir") is None:
            continue
        key = (str(args.save_dir), str(args.get("name", "lightning_logs")))
        if key not in versions:
            versions[key] = _next_version(Path(key[0]) / key[1])
        args.version = versions[key]


TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs",
    # the train stream is endless: trainer.max_steps or model.total_tokens end training, and
    # validation runs every val_check_interval steps
    "max_epochs": -1,
    "val_check_interval": 1000,
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
}


def train_cli(argv: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Run ``prisma-mm train <argv>`` (e.g. ``["fit", "--config", "trainers/x.yaml"]``) and
    return the :class:`TrainCLI` (``.trainer``, ``.model``, ``.datamodule``).

    ``--print_config`` prints the full config and exits (``SystemExit``), as LightningCLI does.
    """
    # the seed is saved in config.yaml; its log line would come before any one-line error
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    args = _resolve_config_args(list(sys.argv[1:] if argv is None else argv))
    with warnings.catch_warnings():
        # `prisma-mm train fit ...` hands LightningCLI its own argv, which differs from sys.argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return TrainCLI(
            # any LightningModule and LightningDataModule by class_path (defaults: SAEModule
            # and ActivationDataModule, see TrainCLI.add_arguments_to_parser)
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            seed_everything_default=0,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            parser_class=TrainParser,
        )


def run_train_cli(argv: list[str] | None = None) -> int:
    """``prisma-mm train ...``: run the subcommand; 0 when it finished (errors raise)."""
    train_cli(argv)
    return 0


if __name__ == "__main__":
    # `python -m prisma_mm.train.cli fit ...` (DDP relaunches the same command per process)
    try:
        sys.exit(run_train_cli())
    except PrismaError as error:
        print(f"prisma-mm: error: {error}", file=sys.stderr)
        sys.exit(2)
