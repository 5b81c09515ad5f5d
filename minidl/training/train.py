"""The training loop: loader -> model -> loss -> backward -> optimizer -> checkpoint.

`train()` sets up a run (`Run`: the recipe, devices, loaders, model, optimizer,
or all of them back from a checkpoint), then alternates `train_epoch` and
`end_epoch` (validation, schedule, checkpoints, curves). It prints nothing: it
reports to a `progress(event)` callback, a dict with "kind" = "start", "step",
"epoch" or "checkpoint", and the CLI draws it.

The recipe is the model file's CONFIG < its BUILTIN_DATA overrides (on the
built-in data) < the caller's options. A resumed run keeps its recipe: it may
change where it runs (devices) and how long (epochs), and refuses in one line
what would make it another run (batch size, initialisation, seed, a dataset
whose content differs, a model file whose source differs unless the user
allows it). A run holds a lock on its output folder while it writes there.

Every random choice derives from (seed, epoch, batch): the loader's order and
augmentation, and the dropout masks (reseeded each step; an element's mask is a
function of that seed, its layer and its row of the global batch). So a run
resumed from a checkpoint, which records where it stood, takes the same steps
as one that never stopped, and N ranks take one process's.

Data parallelism (`data_parallel`, under mpirun; minidl.training.distributed): every rank
holds a replica, trains on its shard of each global batch, and averages the
gradients before the same update. Only rank 0 reports and writes; the loss,
accuracy and validation figures it reports are sums over all ranks, so the
history and the checkpoints are the same as one process's, and a run resumes
with any number of ranks.
"""
import contextlib
import math
import os
import shutil
import tempfile
import time

import numpy as np

from minidl.atomic import remove_stale_temporaries
from minidl.training.checkpoint import ATTRS, HISTORY_KEYS, check_recipe, save_checkpoint
from minidl.core import Tensor
from minidl.data import Loader, builtin_dataset
from minidl.cpu.memory import keep_freed_host_memory
from minidl.device import gpu_count, resolve_devices, set_device_map
from minidl.errors import MinidlError, NonFiniteError
from minidl.training.evaluate import check_labels, evaluate, topk_correct
from minidl.functions import softmax_cross_entropy
from minidl.hdf5 import show
from minidl.layers import seed_dropout
from minidl.layers.summary import check_training_memory
from minidl.training.lock import lock_folder
from minidl.training.model_file import input_scale, load_model_file
from minidl.optim import MomentumSGD, PlateauSchedule
from minidl.training.distributed import Solo, World, rank_device_map
from minidl.training.restore import Restored
from minidl.training.visualize import training_curves


def resolve_config(model_file, builtin, overrides):
    """The recipe of a new run, checked by the rules the checkpoint reader applies: a run never writes
    a checkpoint that would be refused (an epochs=2.0 found only when resuming)."""
    config = dict(model_file.config)
    if builtin:
        config.update(model_file.builtin_overrides)
    config.update({k: v for k, v in overrides.items() if v is not None})
    check_recipe(config, model_file.path)
    return config


def step_seed(seed, epoch, batch):
    """The dropout seed of one step: a pure function of where the run stands."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + batch


def refuse_changes(checkpoint, *, batch_size, init, seed, data, model_file, allow_model_change=False):
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


def refuse_other_data(checkpoint, data_path, fingerprint):
    """A resumed run trains on the same data: the same content, wherever it lies (a copy or a link of the
    dataset is fine, another file put at its path is not). Older checkpoints lack the fingerprint."""
    saved = checkpoint.attrs.get("data_sha256")
    if saved is not None and fingerprint != saved:
        trained_on = checkpoint["data"] or "the built-in data"
        raise MinidlError(f"{data_path} is not the dataset {checkpoint.path} was trained on ({show(trained_on)}): "
                          "its labels, split or statistics differ; resume with that dataset, or start a new run")


def check_before_training(model, out_dir, batch_size, input_size):
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
    if free < 2 * checkpoint_bytes + 2 ** 24:
        raise MinidlError(f"{out_dir} has {free / 2**20:,.0f} MiB free; its checkpoints need about "
                          f"{(2 * checkpoint_bytes + 2 ** 24) / 2**20:,.0f} MiB (two of {checkpoint_bytes / 2**20:,.0f} MiB)")
    check_training_memory(model, batch_size, input_size)


class Run:
    """Everything one training run holds, and where it stands (epoch, batch, step)."""

    def __init__(self, model_path, *, data, devices, epochs, batch_size, out_dir, resume, seed, init, report,
                 skip_nonfinite=False, data_parallel=False, allow_model_change=False):
        self.world = world = World() if data_parallel else Solo()
        if data_parallel:  # before any device is resolved: cuda:N names a GPU of this rank's slice
            mapping = rank_device_map(world, devices if devices is None or isinstance(devices, str)
                                      else ",".join(devices), gpu_count())
            if mapping:
                set_device_map(mapping)
        self.report = report = report if world.rank == 0 else (lambda event: None)
        self.skip_nonfinite, self.skipped = skip_nonfinite, 0
        restored = None
        if resume:
            restored = Restored(resume, model_path, devices, how="as MODEL_FILE")
            checkpoint = restored.checkpoint
            model_file = restored.model_file
            refuse_changes(checkpoint, batch_size=batch_size, init=init, seed=seed, data=data, model_file=model_file,
                           allow_model_change=allow_model_change)
            # the data given (checked by content below), else the recorded path (checked too), else the built-in
            data, seed = data or checkpoint["data"] or None, checkpoint["seed"]
            config = {**checkpoint.config(), **({"epochs": epochs} if epochs else {})}
            check_recipe(config, resume)  # a new epochs: by the same rules
        else:
            if model_path is None:
                raise MinidlError("no model file: give one (e.g. models/alexnet.py), or --resume a checkpoint")
            model_file = load_model_file(model_path)
            seed = 0 if seed is None else seed
            if not ATTRS["seed"].ok(seed):  # the CLI's --seed has this range; a library caller is told too
                raise MinidlError(f"seed {seed} is not {ATTRS['seed'].expected}")
            config = resolve_config(model_file, data is None, dict(epochs=epochs, batch_size=batch_size, init=init))
        self.config, self.seed = config, seed
        if config["batch_size"] % world.size:
            raise MinidlError(f"--batch-size {config['batch_size']} (the global batch) does not divide among "
                              f"{world.size} ranks: use a multiple of {world.size}")
        self.devices = restored.devices if restored else resolve_devices(devices, config["devices"])
        if data is None and world.rank != 0:  # rank 0 generates the built-in data once; the others then read it
            world.barrier()
        data_path = data or builtin_dataset(progress=lambda done, total: report(
            dict(kind="builtin-data", done=done, total=total)))
        if data is None and world.rank == 0:
            world.barrier()

        scale = input_scale(config, config["init"])
        shard = (world.rank, world.size)
        self.train_loader = Loader(data_path, split="train", batch_size=config["batch_size"], crop=config["input_size"],
                                   augment=True, seed=seed, drop_last=True, scale=scale, shard=shard)
        self.val_loader = Loader(data_path, split="val", batch_size=config["batch_size"], crop=config["input_size"],
                                 augment=False, seed=seed, scale=scale, shard=shard)
        if restored:
            refuse_other_data(restored.checkpoint, data_path, self.train_loader.fingerprint)
        if len(self.train_loader) == 0:
            raise MinidlError(f"{data_path} has fewer training images ({self.train_loader.num_images}) "
                              f"than one batch ({config['batch_size']})")
        if self.val_loader.num_images == 0:  # every epoch ends in validation: refused before the first
            raise MinidlError(f"{data_path} has no validation images: make it again with minidl prepare-data, "
                              "which keeps one of every class of two images or more")
        num_classes = restored.checkpoint["num_classes"] if restored else self.train_loader.num_classes
        check_labels(num_classes, self.train_loader.num_classes, data_path)

        self.model = restored.model if restored else model_file.build(
            num_classes, [d.name for d in self.devices], config["init"], seed)
        world.broadcast_params(self.model.params())
        self.buckets = world.gradient_buckets(self.model.params())  # None in a single process
        self.optimizer = MomentumSGD(self.model.params(), config["lr"], config["momentum"], config["weight_decay"])
        self.schedule = PlateauSchedule(config["lr"], config["lr_drop_factor"], config["plateau_patience"],
                                        config["lr_drops"])
        self.history = {k: [] for k in HISTORY_KEYS}
        self.epoch, self.batch, self.step = 0, 0, 0
        self.totals = dict(loss_sum=0.0, correct=0, seen=0)  # of the unfinished epoch
        if restored:
            checkpoint = restored.checkpoint
            self.optimizer.load_state(checkpoint.velocities(self.model))
            self.schedule.load_state(checkpoint.schedule)
            self.history = checkpoint.history
            self.epoch, self.batch, self.step = checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]
            self.totals.update(checkpoint.epoch_totals)

        self.meta = dict(model_file=model_file.path, model_source=model_file.source, model_sha256=model_file.sha256,
                         config=config, class_names=list(self.train_loader.class_names), num_classes=num_classes,
                         devices=[d.name for d in self.devices],
                         data="" if data is None else os.path.abspath(data_path),
                         data_sha256=self.train_loader.fingerprint, seed=seed)
        self.last_path, self.best_path = os.path.join(out_dir, "last.h5"), os.path.join(out_dir, "best.h5")
        self.curves_path = os.path.join(out_dir, "curves.png")
        # the one writer holds --out until the run ends (close), before it removes temporaries as stale
        self.lock = lock_folder(out_dir) if world.rank == 0 else None
        try:
            if world.rank == 0:  # before the free-space check, which they would fail
                for path in (self.last_path, self.best_path, self.curves_path):  # left by a run that was killed
                    remove_stale_temporaries(path)
            check_before_training(self.model, out_dir, config["batch_size"] // world.size, config["input_size"])
        except BaseException:
            self.close()
            raise
        report(dict(kind="start", config=config, devices=[d.name for d in self.devices], data=data_path,
                    train_images=self.train_loader.num_images, val_images=self.val_loader.num_images,
                    classes=num_classes, params=self.model.num_params(), start_epoch=self.epoch,
                    start_batch=self.batch))

    def close(self):
        """Let another run write to --out, and take the gradient buckets' hooks off the model."""
        if self.buckets:
            self.buckets.close()
        if self.lock is not None:
            self.lock.release()

    def save(self, path):
        self._check_update()  # on every rank (it decides together): never a checkpoint after a bad update
        if self.world.rank != 0:  # the replicas are identical: one writer
            return
        save_checkpoint(path, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
                        meta={**self.meta, "epoch": self.epoch, "batch": self.batch, "step": self.step},
                        history=self.history, epoch_totals=self.totals, mean_image=self.train_loader.mean)
        self.report(dict(kind="checkpoint", path=path, epoch=self.epoch, batch=self.batch))

    def train_epoch(self, *, log_every, checkpoint_seconds, max_steps):
        """Train from where the run stands to the end of its epoch; False if max_steps stopped it first."""
        # closing: an error or Ctrl-C during the steps stops the loader's thread (see BackgroundIterator)
        with contextlib.closing(self.train_loader.epoch_batches(self.epoch, start=self.batch)) as batches:
            return self._train_batches(batches, log_every, checkpoint_seconds, max_steps)

    def _train_batches(self, batches, log_every, checkpoint_seconds, max_steps):
        model, xp = self.model, self.model.output_device.xp
        model.train()
        self.optimizer.lr = self.schedule.lr
        # running sums stay on the device; they are read once per log interval
        interval = dict(loss=0.0, correct=0, seen=0, start=time.perf_counter())
        last_save = time.monotonic()
        for images, labels in batches:
            # the masks of the global batch's rows, whichever rank holds them: this rank's rows start at
            # rank * local batch (the Loader shard's even split), so N ranks draw one process's masks
            seed_dropout(model, step_seed(self.seed, self.epoch, self.batch), first_row=self.world.rank * len(labels))
            x = Tensor(images, device=model.input_device)
            y = Tensor(labels.astype(np.int32), device=model.output_device)  # what the loss kernels read
            logits = model(x)
            # the dataset's reader checked every label against its classes, and check_labels those against
            # the model's: no per-step check, which on a GPU would wait for a read back
            loss = softmax_cross_entropy(logits, y, checked=True)
            self.optimizer.zero_grad()
            loss.backward()
            if self.buckets:
                self.buckets.average()
            if self._diverged(loss):  # a skipped batch: no update, nothing counted
                self.batch += 1
                del logits, loss
                continue
            self.optimizer.step()  # its verdict on the new weights is read with the next step's loss, or below
            self.updated_at = (self.epoch, self.batch)
            self.step, self.batch = self.step + 1, self.batch + 1
            with model.output_device:
                interval["loss"] += loss.data.astype(xp.float64) * len(labels)
                interval["correct"] += topk_correct(xp, logits.data, y.data, 1)
            interval["seen"] += len(labels)
            del logits, loss  # free the graph before the next batch is built
            finished_epoch = self.batch == len(self.train_loader)
            if self.step % log_every == 0 or finished_epoch or self.step == max_steps:
                self._log(interval)
                interval = dict(loss=0.0, correct=0, seen=0, start=time.perf_counter())
                if self.step == max_steps and not finished_epoch:
                    self.save(self.last_path)
                    return False
                if time.monotonic() - last_save > checkpoint_seconds and not finished_epoch:
                    self.save(self.last_path)
                    last_save = time.monotonic()
        if interval["seen"]:  # the epoch's last batches were skipped after the last log
            self._log(interval)
        self._check_update()  # the epoch's last update, before validation runs on it
        return True

    def _diverged(self, loss):
        """True to skip this batch; raises NonFiniteError to stop, before the update touches the weights.

        One read of the loss and the gradient norm per step, and with it the
        optimizer's verdict on the previous update: a non-finite value must stop
        the run before it reaches the weights, or, made by the update itself
        (a finite gradient times a huge rate), before a checkpoint holds it, so
        that the last checkpoint written stays the last good state.
        """
        loss_value, grad_norm, updated = loss.item(), self.optimizer.grad_norm(), self.optimizer.nonfinite()
        # the ranks decide together: one that skipped or stopped alone would leave the others waiting
        bad_update, bad_step = self.world.sum([bool(updated), not (math.isfinite(loss_value) and
                                                                   math.isfinite(grad_norm))])
        if bad_update:
            raise self._update_error(updated)
        if not bad_step:
            return False
        if not math.isfinite(loss_value):
            what = f"loss is {loss_value}"
        elif not math.isfinite(grad_norm):
            what = f"gradient norm is {grad_norm}"
        else:
            what = "loss of another rank's shard is not finite"
        if self.skip_nonfinite:
            self.skipped += 1
            self.optimizer.zero_grad()
            return True
        raise self._stopped(self.epoch, self.batch, f"the {what}")

    def _check_update(self):
        """Stop if the last update left a weight or velocity NaN or infinite (nothing to read if already read)."""
        updated = self.optimizer.nonfinite()
        if self.world.any(updated):
            raise self._update_error(updated)

    def _update_error(self, params):
        """The update is made: with --skip-nonfinite too, the run stops (the weights it would skip to are gone)."""
        names = [name for name, p in self.model.named_params() if any(p is q for q in params)]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = f"the update of {shown or 'another rank'} overflowed to NaN or infinity (its gradient was finite)"
        if self.skip_nonfinite:
            what += "; --skip-nonfinite cannot skip it, the weights have changed"
        return self._stopped(*self.updated_at, what)

    def _stopped(self, epoch, batch, what):
        kept = (f"{self.last_path} holds the last good state (continue with --resume, at a lower rate)"
                if os.path.exists(self.last_path) else "no checkpoint was written")
        return NonFiniteError(
            f"training stopped at epoch {epoch + 1}, batch {batch + 1}: {what}; the learning rate "
            f"({self.optimizer.lr:g}) is likely too high, or the input badly scaled (CONFIG input_scale); {kept}")

    def _log(self, interval):
        with self.model.output_device:  # the one read from the device per interval
            local = [float(interval["loss"]), int(interval["correct"]), interval["seen"]]
        loss_sum, correct, seen = self.world.sum(local)  # over the ranks: the figures of the global batches
        loss_sum, correct, seen = float(loss_sum), int(correct), int(seen)
        elapsed = time.perf_counter() - interval["start"]
        self.totals = dict(loss_sum=self.totals["loss_sum"] + loss_sum, correct=self.totals["correct"] + correct,
                           seen=self.totals["seen"] + seen)
        self.history["interval_step"].append(self.step)
        self.history["interval_loss"].append(loss_sum / seen)
        self.report(dict(kind="step", epoch=self.epoch, batch=self.batch, batches=len(self.train_loader),
                         step=self.step, loss=loss_sum / seen, top1=correct / seen, images_per_s=seen / elapsed,
                         lr=self.optimizer.lr))

    def end_epoch(self):
        """Validate, record the epoch, step the schedule, write the checkpoints and the curves."""
        val = evaluate(self.model, self.val_loader, reduce=self.world.sum)
        previous_best = max(self.history["val_top1"], default=-1.0)
        seen = max(self.totals["seen"], 1)
        for key, value in (("train_loss", self.totals["loss_sum"] / seen), ("train_top1", self.totals["correct"] / seen),
                           ("val_loss", val["loss"]), ("val_top1", val["top1"]), ("val_top5", val["top5"]),
                           ("lr", self.optimizer.lr)):
            self.history[key].append(value)
        self.schedule.step(1.0 - val["top1"])
        self.totals = dict(loss_sum=0.0, correct=0, seen=0)
        finished = self.epoch
        self.epoch, self.batch = self.epoch + 1, 0
        self.save(self.last_path)
        if val["top1"] > previous_best:
            self.save(self.best_path)
        if self.world.rank == 0:
            training_curves(self.history, self.curves_path)
        self.report(dict(kind="epoch", epoch=finished, val=val, history=self.history, next_lr=self.schedule.lr,
                         finished=self.schedule.finished, skipped=self.skipped))


def train(model_path=None, *, data=None, devices=None, epochs=None, batch_size=None, out_dir="runs/alexnet",
          resume=None, seed=None, init=None, progress=None, log_every=10, checkpoint_seconds=300.0,
          max_steps=None, skip_nonfinite=False, data_parallel=False, allow_model_change=False):
    """Train a model file's network (or resume a checkpoint); returns the history dict.

    A non-finite loss or gradient stops the run (NonFiniteError) before the
    update; with skip_nonfinite the batch is skipped instead, and counted
    (the "epoch" and "end" events carry the count). An update that makes a
    weight or velocity non-finite stops the run in any case, before any
    checkpoint holds it. With data_parallel, this process is one rank of an
    mpirun job (see minidl.training.distributed). A resumed run refuses a model file other
    than the one it was trained with unless allow_model_change.
    """
    if log_every < 1:
        raise MinidlError(f"log_every must be at least 1, got {log_every}")
    keep_freed_host_memory()
    run = Run(model_path, data=data, devices=devices, epochs=epochs, batch_size=batch_size, out_dir=out_dir,
              resume=resume, seed=seed, init=init, report=progress or (lambda event: None),
              skip_nonfinite=skip_nonfinite, data_parallel=data_parallel, allow_model_change=allow_model_change)
    try:
        start = time.monotonic()  # training time: the epochs, validations and checkpoints, not the set-up
        while run.epoch < run.config["epochs"] and not run.schedule.finished:
            if max_steps is not None and run.step >= max_steps:
                break
            if not run.train_epoch(log_every=log_every, checkpoint_seconds=checkpoint_seconds, max_steps=max_steps):
                break
            run.end_epoch()
        run.report(dict(kind="end", skipped=run.skipped, history=run.history, seconds=time.monotonic() - start))
    finally:
        run.close()
    return run.history
