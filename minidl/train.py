"""The training loop: loader -> model -> loss -> backward -> optimizer -> checkpoint.

`train()` resolves a run's settings (model file recipe < built-in data overrides <
the caller's options; on resume, the checkpoint's recipe), then loops over epochs.
It prints nothing: it reports to a `progress(event)` callback, a dict with
"kind" = "start", "step", "epoch" or "checkpoint", and the CLI draws it.

Every random choice derives from (seed, epoch, batch): the loader's order and
augmentation, and the dropout masks (reseeded each step). So a run resumed from
a checkpoint, which records where it stood, takes the same steps as one that
never stopped.
"""
import os
import time

from minidl.checkpoint import HISTORY_KEYS, load_checkpoint, save_checkpoint
from minidl.core import Tensor
from minidl.data import Loader, builtin_dataset
from minidl.device import default_devices, device as as_device, keep_freed_host_memory
from minidl.errors import MinidlError
from minidl.evaluate import check_labels, evaluate, topk_correct
from minidl.layers import seed_dropout
from minidl.functions import softmax_cross_entropy
from minidl.model_file import input_scale, load_model_file
from minidl.optim import MomentumSGD, PlateauSchedule
from minidl.visualize import training_curves


def resolve_config(model_file, builtin, overrides):
    config = dict(model_file.config)
    if builtin:
        config.update(model_file.builtin_overrides)
    config.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("batch_size", "epochs"):
        if int(config[key]) < 1:
            raise MinidlError(f"{key} must be at least 1, got {config[key]}")
    return config


def step_seed(seed, epoch, batch):
    """The dropout seed of one step: a pure function of where the run stands."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + batch


def train(model_path=None, *, data=None, devices=None, epochs=None, batch_size=None, out_dir="runs/alexnet",
          resume=None, seed=0, init=None, progress=None, log_every=10, checkpoint_seconds=300.0,
          max_steps=None):
    """Train a model file's network; returns the history dict. See the module docstring."""
    report = progress or (lambda event: None)
    keep_freed_host_memory()
    checkpoint = load_checkpoint(resume) if resume else None
    if checkpoint is not None:
        model_path = model_path or checkpoint["model_file"]
        data = data or checkpoint["data"] or None
        seed = checkpoint["seed"]
    if model_path is None:
        raise MinidlError("no model file: give one, or --resume a checkpoint that names one")
    model_file = load_model_file(model_path)
    if checkpoint is not None:
        config = {**checkpoint.config(), **({"epochs": epochs} if epochs else {})}
    else:
        config = resolve_config(model_file, data is None,
                                dict(epochs=epochs, batch_size=batch_size, init=init))
    devices = tuple(devices or default_devices())
    if len(devices) != 2:
        raise MinidlError(f"give two devices, one per tower (e.g. cpu,cpu or cuda:0,cuda:0), got {devices}")
    devices = tuple(as_device(d) for d in devices)
    data_path = data or builtin_dataset(progress=lambda done, total: report(
        dict(kind="builtin-data", done=done, total=total)))

    scale = input_scale(config, config["init"])
    train_loader = Loader(data_path, split="train", batch_size=config["batch_size"], crop=config["input_size"],
                          augment=True, seed=seed, drop_last=True, scale=scale)
    val_loader = Loader(data_path, split="val", batch_size=config["batch_size"], crop=config["input_size"],
                        augment=False, seed=seed, scale=scale)
    if len(train_loader) == 0:
        raise MinidlError(f"{data_path} has fewer training images ({train_loader.num_images}) "
                          f"than one batch ({config['batch_size']})")
    num_classes = checkpoint["num_classes"] if checkpoint is not None else train_loader.num_classes
    check_labels(num_classes, train_loader.num_classes, data_path)

    model = model_file.build(num_classes, [d.name for d in devices], config["init"], seed)
    optimizer = MomentumSGD(model.params(), config["lr"], config["momentum"], config["weight_decay"])
    schedule = PlateauSchedule(config["lr"], config["lr_drop_factor"], config["plateau_patience"],
                               config["lr_drops"])
    history = {k: [] for k in HISTORY_KEYS}
    start_epoch, start_batch, step = 0, 0, 0
    totals = dict(loss_sum=0.0, correct=0, seen=0)
    if checkpoint is not None:
        checkpoint.load_into(model, optimizer)
        schedule.load_state(checkpoint.schedule)
        history = checkpoint.history
        start_epoch, start_batch, step = checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]
        totals = {**totals, **checkpoint.epoch_totals}

    os.makedirs(out_dir, exist_ok=True)
    last_path, best_path = os.path.join(out_dir, "last.h5"), os.path.join(out_dir, "best.h5")
    meta = dict(model_file=model_file.path, model_source=model_file.source, config=config,
                class_names=list(train_loader.class_names), num_classes=num_classes,
                devices=[d.name for d in devices], data="" if data is None else os.path.abspath(data_path),
                seed=seed)

    def save(path, epoch, batch):
        save_checkpoint(path, model=model, optimizer=optimizer, schedule=schedule,
                        meta={**meta, "epoch": epoch, "batch": batch, "step": step},
                        history=history, epoch_totals=totals)
        report(dict(kind="checkpoint", path=path, epoch=epoch, batch=batch))

    report(dict(kind="start", config=config, devices=[d.name for d in devices], data=data_path,
                train_images=train_loader.num_images, val_images=val_loader.num_images,
                classes=num_classes, params=model.num_params(), start_epoch=start_epoch,
                start_batch=start_batch))
    xp = model.input_device.xp
    model.train()
    last_save = time.monotonic()
    for epoch in range(start_epoch, config["epochs"]):
        if schedule.finished or (max_steps is not None and step >= max_steps):
            break
        optimizer.lr = schedule.lr
        # running sums stay on the device; they are read once per log interval
        interval = dict(loss=0.0, correct=0, seen=0, start=time.perf_counter())
        batches = train_loader.epoch_batches(epoch, start=start_batch if epoch == start_epoch else 0)
        for batch, (images, labels) in enumerate(batches, start=start_batch if epoch == start_epoch else 0):
            seed_dropout(model, step_seed(seed, epoch, batch))
            x = Tensor(images, device=model.input_device)
            y = Tensor(labels, device=model.output_device)
            logits = model(x)
            loss = softmax_cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            with model.output_device:
                interval["loss"] += loss.data.astype(xp.float64) * len(labels)
                interval["correct"] += topk_correct(xp, logits.data, y.data, 1)
            interval["seen"] += len(labels)
            del logits, loss  # free the graph before the next batch is built
            finished_epoch = batch + 1 == len(train_loader)
            if step % log_every == 0 or finished_epoch or step == max_steps:
                seen = interval["seen"]
                with model.output_device:  # the one read from the device per interval
                    loss_sum, correct = float(interval["loss"]), int(interval["correct"])
                elapsed = time.perf_counter() - interval["start"]
                totals = dict(loss_sum=totals["loss_sum"] + loss_sum, correct=totals["correct"] + correct,
                              seen=totals["seen"] + seen)
                report(dict(kind="step", epoch=epoch, batch=batch + 1, batches=len(train_loader), step=step,
                            loss=loss_sum / seen, top1=correct / seen, images_per_s=seen / elapsed,
                            lr=optimizer.lr))
                interval = dict(loss=0.0, correct=0, seen=0, start=time.perf_counter())
                if step == max_steps and not finished_epoch:
                    save(last_path, epoch, batch + 1)
                    return history
                if time.monotonic() - last_save > checkpoint_seconds and not finished_epoch:
                    save(last_path, epoch, batch + 1)
                    last_save = time.monotonic()
        val = evaluate(model, val_loader)
        model.train()
        previous_best = max(history["val_top1"], default=-1.0)
        for key, value in (("train_loss", totals["loss_sum"] / max(totals["seen"], 1)),
                           ("train_top1", totals["correct"] / max(totals["seen"], 1)),
                           ("val_loss", val["loss"]), ("val_top1", val["top1"]), ("val_top5", val["top5"]),
                           ("lr", optimizer.lr)):
            history[key].append(value)
        schedule.step(1.0 - val["top1"])
        totals = dict(loss_sum=0.0, correct=0, seen=0)
        save(last_path, epoch + 1, 0)
        if val["top1"] > previous_best:
            save(best_path, epoch + 1, 0)
        last_save = time.monotonic()
        training_curves(history, os.path.join(out_dir, "curves.png"))
        report(dict(kind="epoch", epoch=epoch, val=val, history=history, next_lr=schedule.lr,
                    finished=schedule.finished))
    return history
