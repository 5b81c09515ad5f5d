"""The `minidl` command: parses options, calls the library, prints for the user.

This is the only place that prints or exits. A MinidlError (anything the user
can cause) becomes one line on stderr and exit status 1; Ctrl-C exits 130.
"""
import functools
import os
import sys
import time

import click
import numpy as np

from minidl.errors import MinidlError


def friendly_errors(command):
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            # overflow in a diverging run is reported by minidl in one line, not as NumPy warnings
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return command(*args, **kwargs)
        except MinidlError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
    return run


class ProgressLine:
    """A progress bar redrawn in place on a terminal, a line per 10% elsewhere."""

    def __init__(self, label):
        self.label, self.tty, self.last_tenth, self.start = label, sys.stderr.isatty(), -1, time.time()

    def __call__(self, done, total):
        fraction = done / max(total, 1)
        if self.tty:
            bar = "#" * int(30 * fraction)
            click.echo(f"\r{self.label} [{bar:<30}] {done}/{total}", nl=done >= total, err=True)
        elif int(fraction * 10) > self.last_tenth:
            self.last_tenth = int(fraction * 10)
            click.echo(f"{self.label}: {done}/{total} ({time.time() - self.start:.0f} s)", err=True)


@click.group()
@click.version_option(package_name="minidl")
def main():
    """minidl: AlexNet from scratch on NumPy and CuPy."""


@main.command()
@click.argument("model_file", required=False)
@click.option("--data", type=click.Path(), help="A dataset made by `minidl prepare-data` (default: built-in shapes).")
@click.option("--devices", help="The two towers' devices, e.g. cuda:0,cuda:1 or cuda:0 or cpu (default: what is here).")
@click.option("--epochs", type=int, help="Epochs to train (default: the model file's).")
@click.option("--batch-size", type=int, help="Images per step (default: the model file's).")
@click.option("--out", "out_dir", help="Folder for checkpoints and curves (default: runs/alexnet, or the "
              "folder of the --resume checkpoint).")
@click.option("--resume", type=click.Path(), help="Continue from this checkpoint.")
@click.option("--seed", type=int, help="Seed of every random choice (default: 0, or the resumed run's).")
@click.option("--init", type=click.Choice(["he", "paper"]), help="Initialisation (default: the model file's).")
@click.option("--log-every", type=int, default=10, show_default=True, help="Steps between progress lines.")
@click.option("--checkpoint-seconds", type=float, default=300.0, show_default=True,
              help="Also write last.h5 within an epoch when this long has passed since the last one.")
@click.option("--skip-nonfinite", is_flag=True, help="Skip a batch whose loss or gradient is NaN or infinite "
              "(a rare bad batch) instead of stopping; the count is printed at the end.")
@friendly_errors
def train(model_file, data, devices, epochs, batch_size, out_dir, resume, seed, init, log_every, checkpoint_seconds,
          skip_nonfinite):
    """Train MODEL_FILE (e.g. models/alexnet.py); with --resume the file is optional."""
    from minidl.train import train as run_training
    out_dir = out_dir or (os.path.dirname(os.path.abspath(resume)) if resume else os.path.join("runs", "alexnet"))
    builtin_bar = ProgressLine("generating the built-in dataset")

    def show(event):
        kind = event["kind"]
        if kind == "builtin-data":
            builtin_bar(event["done"], event["total"])
        elif kind == "start":
            c = event["config"]
            click.echo(f"training on {event['data']}: {event['train_images']} train / {event['val_images']} val "
                       f"images, {event['classes']} classes; {event['params']:,} parameters on "
                       f"{', '.join(event['devices'])}; batch {c['batch_size']}, {c['epochs']} epochs, "
                       f"lr {c['lr']}, init {c['init']}")
            if event["start_epoch"] or event["start_batch"]:
                click.echo(f"resuming at epoch {event['start_epoch'] + 1}, batch {event['start_batch']}")
        elif kind == "step":
            click.echo(f"epoch {event['epoch'] + 1} batch {event['batch']}/{event['batches']}  "
                       f"loss {event['loss']:.4f}  top-1 {100 * event['top1']:5.1f}%  "
                       f"{event['images_per_s']:6.1f} img/s  lr {event['lr']:g}")
        elif kind == "epoch":
            v = event["val"]
            click.echo(f"epoch {event['epoch'] + 1} validation: loss {v['loss']:.4f}  top-1 {100 * v['top1']:.1f}%  "
                       f"top-5 {100 * v['top5']:.1f}%  (next lr {event['next_lr']:g})")
            if event["finished"]:
                click.echo("validation stopped improving after the last learning-rate drop: done")
        elif kind == "end" and event["skipped"]:
            click.echo(f"skipped {event['skipped']} batch(es) with a NaN or infinite loss or gradient", err=True)

    try:
        history = run_training(model_file, data=data, devices=devices, epochs=epochs,
                               batch_size=batch_size, out_dir=out_dir, resume=resume, seed=seed, init=init,
                               progress=show, log_every=log_every, checkpoint_seconds=checkpoint_seconds,
                               skip_nonfinite=skip_nonfinite)
    except KeyboardInterrupt:
        last = os.path.join(out_dir, "last.h5")
        if os.path.exists(last):  # checkpoints are written atomically: the last one is whole
            raise MinidlError(f"interrupted; continue with: minidl train --resume {last} --out {out_dir}") from None
        raise
    if history["val_top1"]:
        click.echo(f"best validation top-1 {100 * max(history['val_top1']):.1f}%; checkpoints in {out_dir}/ "
                   f"(last.h5, best.h5), curves in {out_dir}/curves.png")


@main.command()
@click.argument("checkpoint")
@click.option("--data", required=True, type=click.Path(), help="A dataset made by `minidl prepare-data`.")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True)
@click.option("--ten-crop", is_flag=True, help="Average the softmax over 4 corners + centre and their mirrors.")
@click.option("--model", "model_file", help="Model file to rebuild the network (default: the one the checkpoint names).")
@click.option("--devices", help="Devices for the two towers (default: the run's, fitted to this machine).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@friendly_errors
def evaluate(checkpoint, data, split, ten_crop, model_file, devices, batch_size):
    """Top-1 and top-5 accuracy of CHECKPOINT on a dataset."""
    from minidl.evaluate import check_labels, evaluate as run_evaluation
    from minidl.restore import Restored
    restored = Restored(checkpoint, model_file, devices)
    loader = restored.loader(data, split=split, batch_size=batch_size, ten_crop=ten_crop)
    check_labels(restored.checkpoint["num_classes"], loader.num_classes, data)
    model = restored.model
    result = run_evaluation(model, loader)
    crops = "10-crop" if ten_crop else "centre crop"
    click.echo(f"{result['count']} {split} images, {crops}: top-1 {100 * result['top1']:.2f}%  "
               f"top-5 {100 * result['top5']:.2f}%  loss {result['loss']:.4f}")


@main.command("visualize-filters")
@click.argument("checkpoint")
@click.option("-o", "--output", default="filters.png", show_default=True, help="PNG to write.")
@friendly_errors
def visualize_filters(checkpoint, output):
    """Draw conv1's kernels as RGB tiles, one block per tower (the paper's Figure 3)."""
    import numpy as np

    from minidl.checkpoint import load_checkpoint
    from minidl.visualize import save_filter_grid
    ckpt = load_checkpoint(checkpoint)
    # the kernels that see the image: 4-D weights over its 3 colour channels, one set per tower
    towers = sorted(name for name, w in ckpt.params.items() if w.ndim == 4 and w.shape[1] == 3)
    if not towers:
        raise MinidlError(f"{checkpoint} has no first-layer convolution (no weights of shape (out, 3, k, k))")
    kernels = np.concatenate([ckpt.params[name] for name in towers])
    save_filter_grid(kernels, output, towers=len(towers))
    click.echo(f"wrote {output}: {len(kernels)} conv1 kernels of {kernels.shape[2]}x{kernels.shape[3]}, "
               f"{len(towers)} tower(s)")


@main.command()
@click.argument("model_file")
@click.option("--classes", type=int, default=1000, show_default=True)
@click.option("--devices", help="Devices for the two towers (default: the model file's, fitted to this machine).")
@friendly_errors
def summary(model_file, classes, devices):
    """Each layer of MODEL_FILE with its device, output shape and parameters."""
    from minidl.layers import summary as layer_summary
    from minidl.model_file import load_model_file
    from minidl.device import resolve_devices
    mf = load_model_file(model_file)
    model = mf.build(classes, [d.name for d in resolve_devices(devices, mf.config["devices"])])
    size = mf.config["input_size"]
    click.echo(layer_summary(model, (1, 3, size, size), device=model.input_device))


@main.command()
@click.argument("model_file")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--devices", help="Devices for the two towers (default: what is here).")
@click.option("--steps", type=int, default=20, show_default=True, help="Timed steps (after 3 warm-up steps).")
@friendly_errors
def bench(model_file, batch_size, devices, steps):
    """Time full training steps of MODEL_FILE on synthetic data."""
    from minidl.bench import bench as run_bench
    from minidl.model_file import load_model_file
    if batch_size < 1 or steps < 1:
        raise MinidlError("--batch-size and --steps must be at least 1")
    result = run_bench(load_model_file(model_file), batch_size=batch_size, steps=steps, devices=devices,
                       progress=ProgressLine("steps"))
    click.echo(f"devices {','.join(result['devices'])}  batch {result['batch_size']}  "
               f"median of {result['steps']} steps: {result['ms_per_step']:.1f} ms/step  "
               f"{result['images_per_s']:.1f} images/s  peak memory {_size(result['peak_memory_bytes'])}")
    work = result.get("device_work_per_step")
    if work is not None:
        kinds = ", ".join(f"{work.get(kind, 0):.0f} {kind}" for kind in ("kernel", "elementwise", "reduction",
                                                                        "gemm", "copy"))
        click.echo(f"device operations per step (emulated GPUs): {sum(v for k, v in work.items() if k != 'bytes'):.0f} "
                   f"({kinds}), moving {_size(work.get('bytes', 0))}")


def _size(nbytes):
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


@main.command("prepare-data")
@click.argument("image_dir")
@click.argument("out")
@click.option("--workers", type=int, help="Decoding processes (default: all cores).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--seed", type=int, help="Seed of every random choice (default: 0, or the resumed run's).")
@friendly_errors
def prepare_data(image_dir, out, workers, val_fraction, seed):
    """Turn IMAGE_DIR (one subfolder per class) into the HDF5 dataset OUT."""
    from minidl.data import prepare_image_folder
    result = prepare_image_folder(image_dir, out, workers=workers, val_fraction=val_fraction, seed=seed,
                                  progress=ProgressLine("decoding images"))
    click.echo(f"wrote {out}: {result.written} images in {len(result.class_counts)} classes")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} unreadable image(s):", err=True)
        for path, reason in result.skipped[:20]:
            click.echo(f"  {path}: {reason}", err=True)


if __name__ == "__main__":
    main()
