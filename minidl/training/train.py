"""The training loop: loader -> model -> loss -> backward -> optimizer -> checkpoint.

`train()` sets up a run (`Run.new`, or `Run.resume` from a checkpoint) over one
`Recipe`, then alternates `Run.train_epoch` and `Run.end_epoch`. It prints
nothing: it reports to a `progress(event)` callback, a dict whose "kind" is
"builtin-data", "start", "step", "epoch", "checkpoint" or "end". Every random
choice derives from (seed, epoch, batch), so a resumed run, or N data-parallel
ranks (minidl.training.distributed), take the steps of one uninterrupted process.
"""
import contextlib
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np

from minidl.atomic import remove_stale_temporaries
from minidl.core import Tensor
from minidl.cpu.memory import keep_freed_host_memory
from minidl.data import Loader, builtin_dataset
from minidl.data.loader import default_workers
from minidl.device import gpu_count, set_device_map
from minidl.errors import MinidlError, NonFiniteError
from minidl.hdf5 import show
from minidl.layers import Layer
from minidl.layers.summary import check_training_memory
from minidl.loss_scale import DynamicLossScale
from minidl.optim import MomentumSGD, PlateauSchedule
from minidl.precision import precision, set_precision
from minidl.training.checkpoint import (ATTRS, HISTORY_KEYS, Checkpoint, check_recipe, input_scale,
                                        save_checkpoint)
from minidl.training.distributed import Solo, World, rank_device_map
from minidl.training.evaluate import check_labels, evaluate
from minidl.training.lock import lock_folder
from minidl.training.metrics import METRICS_FILE, Eta, MetricsLog
from minidl.training.model_file import ModelFile, load_model_file
from minidl.training.restore import Restored
from minidl.training.step import StepGuard, labels_on_output, train_step
from minidl.training.visualize import training_curves

Devices = Union[None, str, Sequence[str]]
Report = Callable[[dict], None]


class Recipe:
    """What a run trains with: its `config` (the recipe a checkpoint records) and its `seed`.

    A new run's config is the model file's CONFIG < its BUILTIN_DATA (on the built-in
    data) < the caller's options; a resumed run's is its checkpoint's, with only the
    epochs changeable. `config["lr"]` is the starting rate: the run's current rate is
    its schedule's (`Run.schedule.lr`), which the optimizer reads.
    """

    def __init__(self, config: dict, seed: int):
        self.config, self.seed = config, seed

    @classmethod
    def new(cls, model_file: ModelFile, *, builtin: bool, epochs: Optional[int] = None,
            batch_size: Optional[int] = None, init: Optional[str] = None, seed: Optional[int] = None) -> "Recipe":
        """A new run's recipe, checked by the rules the checkpoint reader applies (no run writes a checkpoint
        that would be refused)."""
        seed = 0 if seed is None else seed
        if not ATTRS["seed"].ok(seed):  # the CLI's --seed has this range; a library caller is told too
            raise MinidlError(f"seed {seed} is not {ATTRS['seed'].expected}")
        config = {**model_file.config, **(model_file.builtin_overrides if builtin else {})}
        config.update({k: v for k, v in dict(epochs=epochs, batch_size=batch_size, init=init).items()
                       if v is not None})
        check_recipe(config, model_file.path)
        return cls(config, seed)

    @classmethod
    def resumed(cls, checkpoint: Checkpoint, epochs: Optional[int] = None) -> "Recipe":
        """The recipe `checkpoint`'s run was trained with; a new `epochs` checked by the same rules."""
        config = {**checkpoint.config(), **({"epochs": epochs} if epochs else {})}
        check_recipe(config, checkpoint.path, optional=("devices",))
        return cls(config, checkpoint["seed"])

    @property
    def batch_size(self) -> int:
        return self.config["batch_size"]

    @property
    def epochs(self) -> int:
        return self.config["epochs"]

    @property
    def init(self) -> str:
        return self.config["init"]

    def loaders(self, data_path: str, shard: Optional[tuple] = None, val_path: Optional[str] = None,
                workers: int = 0) -> tuple:
        """(train, val) loaders of `data_path`; `shard` = (rank, size) reads a data-parallel rank's share; `workers`
        processes each make their batches (0: a thread).

        With `val_path` (a dataset of the same classes), training takes every image of `data_path` and
        validation every image of `val_path`, centred on the training mean."""
        c, scale = self.config, input_scale(self.config, self.init)
        common = dict(batch_size=c["batch_size"], crop=c["input_size"], seed=self.seed, scale=scale,
                      shard=shard or (0, 1), workers=workers)
        train = Loader(data_path, split="all" if val_path else "train", augment=True, drop_last=True, **common)
        if not val_path:
            return train, Loader(data_path, split="val", augment=False, **common)
        val = Loader(val_path, split="all", augment=False, mean=train.mean, **common)
        if val.class_names != train.class_names:
            raise MinidlError(f"--val-data {val_path} does not have the classes of {data_path} ({val.num_classes} "
                              f"against {train.num_classes}, or in another order): make it with prepare-data "
                              f"--labels ... --classes-from {data_path}")
        return train, val

    def schedule(self) -> PlateauSchedule:
        c = self.config
        return PlateauSchedule(c["lr"], c["lr_drop_factor"], c["plateau_patience"], c["lr_drops"])


class ScheduledSGD(MomentumSGD):
    """MomentumSGD whose learning rate is its schedule's: the rate has one home, the schedule."""

    def __init__(self, params, schedule: PlateauSchedule, momentum: float, weight_decay: float):
        self.schedule = schedule
        super().__init__(params, schedule.lr, momentum, weight_decay)

    @property
    def lr(self) -> float:
        return self.schedule.lr

    @lr.setter
    def lr(self, value: float):  # MomentumSGD.__init__ sets the schedule's rate; nothing else may
        if value != self.schedule.lr:
            raise AttributeError("the learning rate is the schedule's: set schedule.lr")


def step_seed(seed: int, epoch: int, batch: int) -> int:
    """The dropout seed of one step: a pure function of where the run stands."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + batch


def refuse_changes(checkpoint: Checkpoint, *, batch_size: Optional[int], init: Optional[str], seed: Optional[int],
                   data: Optional[str], model_file: ModelFile, allow_model_change: bool = False) -> None:
    """A resumed run is the same run: options that would change its steps are refused, and so is a model
    file whose source is not the one the run was trained with, unless the user allows it."""
    config = checkpoint.config()
    saved_data = checkpoint["data"] or "the built-in data"
    if data is not None and "data_sha256" not in checkpoint.attrs:  # older checkpoints record only the path
        if not checkpoint["data"] or os.path.realpath(data) != os.path.realpath(checkpoint["data"]):
            raise MinidlError(f"--data {data} differs from the resumed run's ({saved_data}): "
                              "a resumed run keeps it; start a new run to change it")
    for option, given, saved in (("--batch-size", batch_size, config["batch_size"]), ("--init", init, config["init"]),
                                 ("--seed", seed, checkpoint["seed"])):
        if given is not None and given != saved:
            raise MinidlError(f"{option} {given} differs from the resumed run's ({saved}): "
                              "a resumed run keeps it; start a new run to change it")
    if model_file.sha256 != checkpoint.model_sha256 and not allow_model_change:
        raise MinidlError(f"{model_file.path} is not the model file {checkpoint.path} was trained with (sha256 "
                          f"{model_file.sha256[:16]}..., the run's {checkpoint.model_sha256[:16]}...): resume with "
                          "that file, or pass --allow-model-change to go on with this one")


def resumed_val_data(checkpoint: Checkpoint, val_data: Optional[str]) -> Optional[str]:
    """The validation dataset a resumed run goes on with: the one it recorded (or the same content, given
    again); a run that validated on its training file's split keeps doing so."""
    saved = checkpoint.attrs.get("val_data") or None
    if val_data is not None and saved is None:
        raise MinidlError(f"--val-data {val_data}: the resumed run validated on a split of its training data "
                          "and keeps doing so; start a new run to change it")
    return val_data or saved


def refuse_other_data(checkpoint: Checkpoint, data_path: str, fingerprint: str) -> None:
    """A resumed run trains on the same data: the same content, wherever it lies (a copy or a link of the
    dataset is fine, another file put at its path is not). Older checkpoints lack the fingerprint."""
    saved = checkpoint.attrs.get("data_sha256")
    if saved is not None and fingerprint != saved:
        trained_on = checkpoint["data"] or "the built-in data"
        raise MinidlError(f"{data_path} is not the dataset {checkpoint.path} was trained on ({show(trained_on)}): "
                          "its labels, split or statistics differ; resume with that dataset, or start a new run")


def check_before_training(model: Layer, out_dir: str, batch_size: int, input_size: int) -> None:
    """What would end a long run late, reported before its first step: an --out that cannot be
    written or has no room for the checkpoints, and a batch that does not fit in memory."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise MinidlError(f"cannot write checkpoints to {out_dir}: {e.strerror}") from None
    # a checkpoint holds the weights and the velocities; replacing one needs room for a second
    checkpoint_bytes = 2 * sum(p.data.nbytes for p in model.params())
    free = shutil.disk_usage(out_dir).free
    needed = 2 * checkpoint_bytes + 2 ** 24
    if free < needed:
        raise MinidlError(f"{out_dir} has {free / 2**20:,.0f} MiB free; its checkpoints need about "
                          f"{needed / 2**20:,.0f} MiB (two of {checkpoint_bytes / 2**20:,.0f} MiB)")
    check_training_memory(model, batch_size, input_size)


def join_world(data_parallel: bool, devices: Devices):
    """This process's World (a rank of an mpirun job) or Solo; with data_parallel, before any device is
    resolved: cuda:N then names a GPU of this rank's slice."""
    if not data_parallel:
        return Solo()
    world = World()
    mapping = rank_device_map(world, devices if devices is None or isinstance(devices, str) else ",".join(devices),
                              gpu_count())
    if mapping:
        set_device_map(mapping)
    return world


class Run:
    """Everything one training run holds, and where it stands (epoch, batch, step): made by new or resume."""

    def __init__(self, recipe: Recipe, world, report: Report, skip_nonfinite: bool = False,
                 workers: Optional[int] = None, loss_scale: bool = False):
        """The run's recipe and world only; `new` and `resume` add its data, model and output folder. `workers`:
        the loaders' processes (None: default_workers()); loss_scale: dynamic loss scaling (minidl.loss_scale)."""
        self.loss_scaling = loss_scale
        self.recipe, self.world, self.lock, self.metrics = recipe, world, None, None
        self.workers = default_workers() if workers is None else workers
        self.report = report if world.rank == 0 else (lambda event: None)
        self.skip_nonfinite, self.skipped = skip_nonfinite, 0
        if recipe.batch_size % world.size:
            raise MinidlError(f"--batch-size {recipe.batch_size} (the global batch) does not divide among "
                              f"{world.size} ranks: use a multiple of {world.size}")

    @classmethod
    def new(cls, model_path: Optional[str], *, out_dir: str, data: Optional[str] = None, devices: Devices = None,
            epochs: Optional[int] = None, batch_size: Optional[int] = None, seed: Optional[int] = None,
            init: Optional[str] = None, report: Report = lambda event: None, skip_nonfinite: bool = False,
            data_parallel: bool = False, workers: Optional[int] = None, val_data: Optional[str] = None,
            loss_scale: Optional[bool] = None) -> "Run":
        """A new run of the model file `model_path`, with the caller's options over its CONFIG."""
        world = join_world(data_parallel, devices)
        if model_path is None:
            raise MinidlError("no model file: give one (e.g. models/alexnet.py), or --resume a checkpoint")
        model_file = load_model_file(model_path)
        recipe = Recipe.new(model_file, builtin=data is None, epochs=epochs, batch_size=batch_size, init=init,
                            seed=seed)
        run = cls(recipe, world, report, skip_nonfinite, workers,
                  fp16_needs_scaling() if loss_scale is None else loss_scale)
        devices = model_file.devices_for(devices)
        data_path = run._open_data(data, data_parallel, val_data=val_data)
        num_classes = run.train_loader.num_classes
        model = model_file.build(num_classes, devices, recipe.init, recipe.seed)
        run._start(model, devices, model_file, data, data_path, num_classes)
        run._open_out(out_dir, data_path)
        return run

    @classmethod
    def resume(cls, checkpoint_path: str, model_path: Optional[str] = None, *, out_dir: str,
               data: Optional[str] = None, devices: Devices = None, epochs: Optional[int] = None,
               batch_size: Optional[int] = None, seed: Optional[int] = None, init: Optional[str] = None,
               report: Report = lambda event: None, skip_nonfinite: bool = False, data_parallel: bool = False,
               allow_model_change: bool = False, workers: Optional[int] = None,
               val_data: Optional[str] = None, loss_scale: Optional[bool] = None) -> "Run":
        """The run of `checkpoint_path`, from where it stood: it may change its devices and epochs, and refuses
        in one line what would make it another run (batch size, init, seed, other data or model file).
        loss_scale None: dynamic loss scaling as the run had it, from the scale it had reached."""
        world = join_world(data_parallel, devices)
        restored = Restored(checkpoint_path, model_path, devices, how="as MODEL_FILE")
        checkpoint = restored.checkpoint
        refuse_changes(checkpoint, batch_size=batch_size, init=init, seed=seed, data=data,
                       model_file=restored.model_file, allow_model_change=allow_model_change)
        saved_scale = checkpoint.loss_scale
        scaling = (saved_scale is not None or fp16_needs_scaling()) if loss_scale is None else loss_scale
        run = cls(Recipe.resumed(checkpoint, epochs), world, report, skip_nonfinite, workers, scaling)
        # the data given (checked by content), else the recorded path (checked too), else the built-in
        data = data or checkpoint["data"] or None
        data_path = run._open_data(data, data_parallel, checkpoint, resumed_val_data(checkpoint, val_data))
        check_labels(checkpoint["num_classes"], run.train_loader.num_classes, data_path)  # before the model is built
        run._start(restored.model, restored.devices, restored.model_file, data, data_path, checkpoint["num_classes"])
        run.optimizer.load_state(checkpoint.velocities(run.model))
        run.schedule.load_state(checkpoint.schedule)
        if scaling and saved_scale is not None:
            run.guard.loss_scale.load_state(saved_scale["scale"], saved_scale["clean_steps"])
        run.history = checkpoint.history
        run.epoch, run.batch, run.step = checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]
        run.totals.update(checkpoint.epoch_totals)
        run._open_out(out_dir, data_path)
        return run

    def _open_data(self, data: Optional[str], data_parallel: bool, checkpoint: Optional[Checkpoint] = None,
                   val_data: Optional[str] = None) -> str:
        """The loaders of `data` (else the built-in data, made once by rank 0), refused in one line if they
        cannot train a run (or are not the data `checkpoint`'s run was trained on); returns their path."""
        world = self.world
        if data is None and world.rank != 0:  # rank 0 generates the built-in data once; the others then read it
            world.barrier()
        data_path = data or builtin_dataset(progress=lambda done, total: self.report(
            dict(kind="builtin-data", done=done, total=total)))
        if data is None and world.rank == 0:
            world.barrier()
        shard = (world.rank, world.size) if data_parallel else None
        self.train_loader, self.val_loader = self.recipe.loaders(data_path, shard, val_data, self.workers)
        self.val_data = val_data
        if checkpoint is not None:
            refuse_other_data(checkpoint, data_path, self.train_loader.fingerprint)
            saved_val = checkpoint.attrs.get("val_data_sha256")
            if val_data and saved_val and self.val_loader.fingerprint != saved_val:
                raise MinidlError(f"{val_data} is not the validation dataset {checkpoint.path} was validated on "
                                  f"({show(checkpoint['val_data'])}); resume with that dataset, or start a new run")
        if len(self.train_loader) == 0:
            raise MinidlError(f"{data_path} has fewer training images ({self.train_loader.num_images}) "
                              f"than one batch ({self.recipe.batch_size})")
        if self.val_loader.num_images == 0:  # every epoch ends in validation: refused before the first
            raise MinidlError(f"{data_path} has no validation images: make it again with minidl prepare-data, "
                              "which keeps one of every class of two images or more")
        return data_path

    def _start(self, model: Layer, devices, model_file: ModelFile, data: Optional[str], data_path: str,
               num_classes: int):
        """The model (built by the caller once the data passed), its optimizer and schedule, at step 0."""
        self.model, self.devices = model, devices
        self.train_loader.device = self.val_loader.device = model.input_device  # the input is made there
        self.world.broadcast_params(model.params())
        self.buckets = self.world.gradient_buckets(model.params())  # None in a single process
        self.schedule = self.recipe.schedule()
        self.optimizer = ScheduledSGD(model.params(), self.schedule, self.recipe.config["momentum"],
                                      self.recipe.config["weight_decay"])
        self.guard = StepGuard(model, self.optimizer, skip=self.skip_nonfinite,
                               before_read=self.buckets.settle if self.buckets else None,
                               loss_scale=DynamicLossScale() if self.loss_scaling else None)
        # the steps read, not reported; `waiting`: seconds spent waiting for the loader
        self.interval = dict(loss=0.0, correct=0, seen=0, start=time.perf_counter(), waiting=0.0)
        self.history = {k: [] for k in HISTORY_KEYS}
        self.epoch, self.batch, self.step = 0, 0, 0
        self.totals = dict(loss_sum=0.0, correct=0, seen=0)  # of the unfinished epoch
        self.meta = dict(model_file=model_file.path, model_source=model_file.source, model_sha256=model_file.sha256,
                         config=self.recipe.config, class_names=list(self.train_loader.class_names),
                         num_classes=num_classes, devices=[d.name for d in devices],
                         data="" if data is None else os.path.abspath(data_path),
                         data_sha256=self.train_loader.fingerprint, seed=self.recipe.seed)
        if self.val_data:  # what a resumed run validates on again
            self.meta.update(val_data=os.path.abspath(self.val_data), val_data_sha256=self.val_loader.fingerprint)

    def _open_out(self, out_dir: str, data_path: str):
        """Hold --out (the one writer, until close), clear what a killed run left there, check it can take the
        checkpoints and the batch fits in memory, and report the start."""
        self.last_path, self.best_path = os.path.join(out_dir, "last.h5"), os.path.join(out_dir, "best.h5")
        self.curves_path = os.path.join(out_dir, "curves.png")
        # before it removes temporaries as stale
        self.lock = lock_folder(out_dir) if self.world.rank == 0 else None
        try:
            if self.world.rank == 0:  # before the free-space check, which they would fail
                # left by a run that was killed
                for path in (self.last_path, self.best_path, self.curves_path, os.path.join(out_dir, METRICS_FILE)):
                    remove_stale_temporaries(path)
            check_before_training(self.model, out_dir, self.recipe.batch_size // self.world.size,
                                  self.recipe.config["input_size"])
            if self.world.rank == 0:  # a resumed run keeps its rows up to where it stands; a new one starts afresh
                self.metrics = MetricsLog(out_dir, (self.epoch, self.batch) if self.step else None)
            self.eta = Eta(self.step)
        except BaseException:
            self.close()
            raise
        self.report(dict(kind="start", config=self.recipe.config, devices=self.meta["devices"], data=data_path,
                         train_images=self.train_loader.num_images, val_images=self.val_loader.num_images,
                         classes=self.meta["num_classes"], params=self.model.num_params(), start_epoch=self.epoch,
                         start_batch=self.batch))

    def close(self) -> None:
        """Let another run write to --out, and take the gradient buckets' hooks off the model."""
        if self.buckets:
            self.buckets.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()

    def save(self, path: str) -> None:
        """Write a checkpoint of where the run stands to `path` (rank 0; every rank checks the last update)."""
        self._take_steps()  # on every rank (they judge alike): never a checkpoint after a bad update
        if self.world.rank != 0:  # the replicas are identical: one writer
            return
        scaling = self.guard.loss_scale
        if scaling is not None:
            scale, clean_steps = scaling.state()
            scaling = dict(scale=scale, clean_steps=clean_steps, growth_interval=scaling.growth_interval)
        save_checkpoint(path, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
                        meta={**self.meta, "epoch": self.epoch, "batch": self.batch, "step": self.step},
                        history=self.history, epoch_totals=self.totals, mean_image=self.train_loader.mean,
                        loss_scale=scaling)
        self.report(dict(kind="checkpoint", path=path, epoch=self.epoch, batch=self.batch))

    def train_epoch(self, *, log_every: int, checkpoint_seconds: float, max_steps: Optional[int]) -> bool:
        """Train from where the run stands to the end of its epoch; False if max_steps stopped it first."""
        # closing: an error or Ctrl-C during the steps stops the loader's thread (see BackgroundIterator)
        with contextlib.closing(self.train_loader.epoch_batches(self.epoch, start=self.batch,
                                                                labels_on_device=True)) as batches:
            return self._train_batches(batches, log_every, checkpoint_seconds, max_steps)

    def _train_batches(self, batches, log_every, checkpoint_seconds, max_steps):
        model = self.model
        model.train()
        last_save = time.monotonic()
        self.interval["start"] = time.perf_counter()  # empty here: the last epoch ended with a report
        waiting_since = time.perf_counter()
        for images, labels in batches:
            self.interval["waiting"] += time.perf_counter() - waiting_since  # for the data, not the steps
            x = Tensor(images, device=model.input_device)
            y = labels_on_output(labels, model)
            # the dataset's reader checked every label against its classes, and check_labels those against the
            # model's: no per-step check, which on a GPU would wait for a read back. The masks are the global
            # batch's rows: this rank's start at rank * local batch (the Loader shard's even split)
            train_step(model, self.optimizer, x, y, step_seed(self.recipe.seed, self.epoch, self.batch),
                       first_row=self.world.rank * len(labels), checked=True, guard=self.guard, buckets=self.buckets,
                       position=(self.epoch, self.batch))
            # counted as taken: a step the guard skipped is taken back when read (_take_steps)
            self.step, self.batch = self.step + 1, self.batch + 1
            finished_epoch = self.batch == len(self.train_loader)
            if self.step % log_every == 0 or finished_epoch or self.step == max_steps:
                self._take_steps()
                self._log(batches)
                if max_steps is not None and self.step >= max_steps and not finished_epoch:
                    self.save(self.last_path)
                    return False
                if time.monotonic() - last_save > checkpoint_seconds and not finished_epoch:
                    self.save(self.last_path)
                    last_save = time.monotonic()
            waiting_since = time.perf_counter()
        self._take_steps()  # nothing is left unread, unless the loader ended early
        self._log(batches)
        return True

    def _take_steps(self):
        """Read the steps since the last read (the one blocking read of an interval): count their figures,
        take back the skipped ones, and stop on a bad one (unless skipped) or an update that overflowed."""
        read = self.guard.read()
        bad = [s for s in read.steps if s.bad]
        first_bad = bad[0] if bad else None
        if read.overflowed and (first_bad is None or self.skip_nonfinite or read.overflowed[0][1] < first_bad.number):
            params = [p for p, _ in read.overflowed]
            raise self._update_error(params, read.position_of(read.overflowed[0][1]))
        if first_bad is not None:
            # the ranks judged alike (a bad loss reaches every rank through the sums); the message says whose
            another_rank = self.world.sum([0.0 if math.isfinite(first_bad.loss) else 1.0])[0] > 0
            # under loss scaling, scaled gradients that overflowed (every rank's loss finite) only cost their steps
            scale_overflow = self.loss_scaling and self.world.sum(
                [float(sum(not math.isfinite(s.loss) for s in bad))])[0] == 0
            if not (self.skip_nonfinite or scale_overflow):
                what = (f"loss is {first_bad.loss}" if not math.isfinite(first_bad.loss) else
                        "loss of another rank's shard is not finite" if another_rank else
                        "gradient is NaN or infinite")
                raise self._stopped(*first_bad.position, f"the {what}")
            self.skipped += len(bad)
            self.step -= len(bad)
        good = [s for s in read.steps if not s.bad]
        self.interval["loss"] += sum(s.loss * s.rows for s in good)
        self.interval["correct"] += sum(s.correct for s in good)
        self.interval["seen"] += sum(s.rows for s in good)

    def _update_error(self, params, position):
        """The update is made: with --skip-nonfinite too, the run stops (the weights it would skip to are gone)."""
        names = [name for name, p in self.model.named_params() if any(p is q for q in params)]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = f"the update of {shown or 'another rank'} overflowed to NaN or infinity (its gradient was finite)"
        if self.skip_nonfinite:
            what += "; --skip-nonfinite cannot skip it, the weights have changed"
        return self._stopped(*position, what)

    def _stopped(self, epoch, batch, what):
        kept = (f"{self.last_path} holds the last good state (continue with --resume, at a lower rate)"
                if os.path.exists(self.last_path) else "no checkpoint was written")
        return NonFiniteError(
            f"training stopped at epoch {epoch + 1}, batch {batch + 1}: {what}; the learning rate "
            f"({self.schedule.lr:g}) is likely too high, or the input badly scaled (CONFIG input_scale); {kept}")

    def _log(self, batches):
        """Report the steps counted since the last report (nothing if none)."""
        interval, self.interval = self.interval, dict(loss=0.0, correct=0, seen=0, start=time.perf_counter(),
                                                      waiting=0.0)
        if not interval["seen"]:  # every step since the last report was skipped
            return
        local = [interval["loss"], interval["correct"], interval["seen"]]
        loss_sum, correct, seen = self.world.sum(local)  # over the ranks: the figures of the global batches
        loss_sum, correct, seen = float(loss_sum), int(correct), int(seen)
        elapsed = time.perf_counter() - interval["start"]
        self.totals = dict(loss_sum=self.totals["loss_sum"] + loss_sum, correct=self.totals["correct"] + correct,
                           seen=self.totals["seen"] + seen)
        self.history["interval_step"].append(self.step)
        self.history["interval_loss"].append(loss_sum / seen)
        row = dict(step=self.step, epoch=self.epoch + 1, batch=self.batch, loss=loss_sum / seen, top1=correct / seen,
                   images_per_s=seen / elapsed, lr=self.schedule.lr, seconds=round(elapsed, 3))
        if self.metrics is not None:
            self.metrics.append("interval", **row)
        self.eta.stepped(self.step, elapsed)
        eta_epoch, eta_run = self.eta.remaining(self.epoch, self.batch, len(self.train_loader), self.recipe.epochs,
                                                len(self.val_loader))
        self.report(dict(kind="step", epoch=self.epoch, batch=self.batch, batches=len(self.train_loader),
                         step=self.step, loss=loss_sum / seen, top1=correct / seen, images_per_s=seen / elapsed,
                         lr=self.schedule.lr, eta_epoch_s=eta_epoch, eta_run_s=eta_run,
                         rates=rates(batches, seen, elapsed - interval["waiting"], self.world.size)))

    def end_epoch(self) -> None:
        """Validate, record the epoch, step the schedule, write the checkpoints and the curves."""
        started = time.perf_counter()
        val = evaluate(self.model, self.val_loader, reduce=self.world.sum)
        self.eta.validated(time.perf_counter() - started)
        previous_best = max(self.history["val_top1"], default=-1.0)
        seen = max(self.totals["seen"], 1)
        for key, value in (("train_loss", self.totals["loss_sum"] / seen),
                           ("train_top1", self.totals["correct"] / seen), ("val_loss", val["loss"]),
                           ("val_top1", val["top1"]), ("val_top5", val["top5"]), ("lr", self.schedule.lr)):
            self.history[key].append(value)
        if self.metrics is not None:
            self.metrics.append("validation", epoch=self.epoch + 1, step=self.step, loss=val["loss"],
                                top1=val["top1"], top5=val["top5"],
                                **{key: self.history[key][-1] for key in ("train_loss", "train_top1", "lr")})
        self.schedule.step(1.0 - val["top1"])
        self.totals = dict(loss_sum=0.0, correct=0, seen=0)
        finished = self.epoch
        self.epoch, self.batch = self.epoch + 1, 0
        self.save(self.last_path)
        if val["top1"] > previous_best:
            self.save(self.best_path)
        if self.world.rank == 0:  # from the metrics log, unless it began after the run did (an older run's)
            logged = self.metrics.history()
            training_curves(logged if len(logged["val_top1"]) == len(self.history["val_top1"]) else self.history,
                            self.curves_path)
        self.report(dict(kind="epoch", epoch=finished, val=val, history=self.history, next_lr=self.schedule.lr,
                         finished=self.schedule.finished, skipped=self.skipped))


def fp16_needs_scaling() -> bool:
    """Whether the precision set is fp16: its gradients underflow without loss scaling (bf16 has float32's
    exponent range and needs none)."""
    return precision() == "fp16"


def rates(batches, seen: int, stepping_seconds: float, ranks: int) -> dict:
    """Images/s of the data (what the loaders could deliver: minidl.data.loader.Batches) and of the steps alone
    (`seen` global images over the interval's time not spent waiting for the loader)."""
    step = seen / stepping_seconds if stepping_seconds > 0 else math.nan
    return dict(data=ranks * batches.delivery_rate(), step=step)


def train(model_path: Optional[str] = None, *, data: Optional[str] = None, devices: Devices = None,
          epochs: Optional[int] = None, batch_size: Optional[int] = None, out_dir: str = "runs/alexnet",
          resume: Optional[str] = None, seed: Optional[int] = None, init: Optional[str] = None,
          progress: Optional[Report] = None, log_every: int = 10, checkpoint_seconds: float = 300.0,
          max_steps: Optional[int] = None, skip_nonfinite: bool = False, data_parallel: bool = False,
          allow_model_change: bool = False, workers: Optional[int] = None,
          precision: Optional[str] = None, val_data: Optional[str] = None, loss_scale: Optional[bool] = None) -> dict:
    """Train a model file's network (or resume a checkpoint); returns the history dict.

    A non-finite loss or gradient stops the run (NonFiniteError, at the next log interval, naming
    the step; no update is made from that step on); with skip_nonfinite the batch is skipped
    instead, and counted. An update that makes a weight or velocity non-finite stops the run in
    any case, before any checkpoint holds it. With data_parallel, this is one rank of an mpirun job.
    A resumed run refuses a model file other than its own unless allow_model_change. `workers`: the loaders'
    processes (None: the cores available minus one; 0: a thread). precision: set_precision's, for the process.
    val_data: a dataset of the same classes to validate on (then training takes every image of `data`).
    loss_scale: dynamic loss scaling (minidl.loss_scale: a step whose scaled gradients overflow is skipped and
    the scale backs off); None: on under precision "fp16" (whose gradients would underflow without it), else
    off in a new run and as the checkpoint had it in a resumed one.
    """
    if log_every < 1:
        raise MinidlError(f"log_every must be at least 1, got {log_every}")
    if precision is not None:
        set_precision(precision)
    keep_freed_host_memory()
    options = dict(data=data, devices=devices, epochs=epochs, batch_size=batch_size, seed=seed, init=init,
                   out_dir=out_dir, report=progress or (lambda event: None), skip_nonfinite=skip_nonfinite,
                   data_parallel=data_parallel, workers=workers, val_data=val_data, loss_scale=loss_scale)
    if resume:
        run = Run.resume(resume, model_path, allow_model_change=allow_model_change, **options)
    else:
        run = Run.new(model_path, **options)
    try:
        start = time.monotonic()  # training time: the epochs, validations and checkpoints, not the set-up
        while run.epoch < run.recipe.epochs and not run.schedule.finished:
            if max_steps is not None and run.step >= max_steps:
                break
            if not run.train_epoch(log_every=log_every, checkpoint_seconds=checkpoint_seconds, max_steps=max_steps):
                break
            run.end_epoch()
        run.report(dict(kind="end", skipped=run.skipped, history=run.history, seconds=time.monotonic() - start))
    finally:
        run.close()
    return run.history

