"""The `minidl` command: parses options, calls the library, prints for the user.

This is the only place that prints or exits. A MinidlError (anything the user
can cause) becomes one line on stderr and exit status 1; Ctrl-C exits 130.
"""
import contextlib
import functools
import math
import os
import signal
import sys
import threading
import time

import click
import numpy as np

from minidl.errors import MinidlError
from minidl.hdf5 import MAX_CLASSES, MAX_SEED
from minidl.precision import DEFAULT_PRECISION, PRECISIONS

OTHER_RANKS_WAIT = 3  # seconds (see _say_error)
EXIT_GRACE_SECONDS = 3  # how long a stopped command's exit may take (see _end_within)


def friendly_errors(command):
    @functools.wraps(command)
    def run(*args, **kwargs):
        previous_hook = sys.unraisablehook
        sys.unraisablehook = functools.partial(_redeliver_interrupts, previous_hook)
        status = 0
        try:
            try:
                # overflow in a diverging run is reported by minidl in one line, not as NumPy warnings
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    return command(*args, **kwargs)
            except MinidlError as e:
                _say_error(e)
                sys.exit(1)
            except KeyboardInterrupt as e:
                _say_interrupted(e)
            except Exception as e:  # Python may wrap a Ctrl-C: in a class's __set_name__, a module's import
                interrupt = _interrupt_behind(e)
                if interrupt is None:
                    raise
                _say_interrupted(interrupt)
        except SystemExit as done:
            status = done.code
            raise
        finally:
            sys.unraisablehook = previous_hook
            _end_now_if_hdf5_failed(status)
    return run


def _interrupt_behind(error):
    """The KeyboardInterrupt among the causes of `error`, if any."""
    while error is not None and not isinstance(error, KeyboardInterrupt):
        error = error.__cause__ or error.__context__
    return error


def _end_within(seconds, status):
    """End the process with `status` if its exit has not ended it within `seconds`. After Ctrl-C or an
    error, Python's exit still runs the cleanups (the loader's workers joined, HDF5 files closed), all
    of them for files already abandoned or written and renamed; one that hangs (seen, rarely, under
    heavy load; cause unknown) must not keep a stopped command alive."""
    def end():
        sys.stderr.flush()
        os._exit(status if isinstance(status, int) else 1)
    timer = threading.Timer(seconds, end)
    timer.daemon = True  # never what keeps the process alive
    timer.start()


def _end_now_if_hdf5_failed(status):
    """End the process at once, its output flushed, if an HDF5 file failed to write (a full disk): h5py
    would crash the exit (SIGSEGV) freeing that file (minidl.atomic.atomic_hdf5)."""
    atomic = sys.modules.get("minidl.atomic")  # not imported here: nothing was written without it
    if atomic and atomic.hdf5_write_failed():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if status is None else status if isinstance(status, int) else 1)


class NumberRange(click.FloatRange):
    """click's FloatRange, refusing NaN too, which passes every bound (any comparison with NaN is false)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


SEED = click.IntRange(0, MAX_SEED)  # what a checkpoint keeps (a 64-bit integer)
PRECISION = click.option(
    "--precision", type=click.Choice(PRECISIONS), default=DEFAULT_PRECISION, show_default=True,
    help="The network's arithmetic: tf32 (float32, GEMMs on tensor cores with inputs rounded to 10 mantissa "
         "bits, as PyTorch's convolutions), fp32 (exact FP32 GEMMs, slower), or fp16 / bf16 (mixed precision as "
         "PyTorch's autocast: convolutions and fully connected layers in 16 bits, float32 master weights and "
         "loss; train turns on --loss-scale for fp16). On the CPU fp32 and tf32 are the same, and fp16 / bf16 "
         "are computed in float32 and rounded: for testing, not faster.")


def _redeliver_interrupts(previous_hook, unraisable):
    """A Ctrl-C that lands in a __del__ or a weakref callback is only printed there ("Exception ignored
    in ..."), and the command would go on: deliver it again, from a thread once this hook has returned
    (Python would handle a signal raised here at once, here again, and swallow it again)."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    else:
        previous_hook(unraisable)


def _world():
    """The data-parallel job this process is a rank of, if any."""
    parallel = sys.modules.get("minidl.training.distributed")  # not imported here: this may run during an import
    return parallel and parallel.World.joined


def _say_interrupted(interrupt):
    """Exit 130, saying so; the interrupt's text, if any, says how to go on (train: the --resume line)."""
    world = _world()
    if not (world and world.rank):  # Ctrl-C reaches every rank of a data-parallel job: one line
        click.echo(f"\ninterrupted{'; ' if str(interrupt) else ''}{interrupt}", err=True)
    sys.exit(130)


def _say_error(message):
    """The error line; in a data-parallel job, once per job, and the job ended.

    The ranks mostly fail alike, and rank 0 says so at once and ends the job
    (World.abort: a rank that merely exited would wait in MPI's finalisation for
    the others). Another rank waits first, and is ended meanwhile if rank 0 failed
    too: it speaks, naming itself, only when the error is its own."""
    world = _world()
    if world and world.rank:
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(OTHER_RANKS_WAIT)
        message = f"rank {world.rank}: {message}"
    click.echo(f"error: {message}", err=True)
    if world:
        world.abort(1)


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


def _clock(seconds):
    """Seconds as m:ss, or h:mm:ss from an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PassProgress:
    """Progress of a job's passes, reported as (pass, done, total): on a terminal a bar with the count, rate
    and time left (click.progressbar), elsewhere a line at the start of each pass, a line a minute and one
    at its end."""

    LINE_SECONDS = 60

    def __init__(self):
        self.tty, self.bar, self.stage = sys.stderr.isatty(), None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._end_bar()

    def __call__(self, stage, done, total):
        now = time.monotonic()
        if stage != self.stage:
            self._end_bar()
            self.stage, self.first, self.start, self.last_line, self.done = stage, done, now, -math.inf, done
            if self.tty:
                self.bar = click.progressbar(length=total, label=stage, show_pos=True, show_eta=True, file=sys.stderr,
                                             item_show_func=lambda rate: rate)
                self.bar.__enter__()
                self.bar.update(done)
        rate = (done - self.first) / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(done - self.done, f"{rate:,.0f}/s")
        elif now - self.last_line >= self.LINE_SECONDS or done >= total:
            self.last_line = now
            speed = f", {rate:,.0f}/s" if done > self.first else ""
            left = f", about {_duration((total - done) / rate)} left" if 0 < rate and done < total else ""
            click.echo(f"{stage}: {done:,}/{total:,} ({100 * done / max(total, 1):.0f}%){speed}{left}", err=True)
        self.done = done

    def _end_bar(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _duration(seconds):
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{max(minutes, 1)} min"


class TrainingReport:
    """Prints the events minidl.training.train reports: a line per start, log interval, epoch and end."""

    def __init__(self, out_dir):
        self.out_dir, self.builtin_bar = out_dir, ProgressLine("generating the built-in dataset")

    def __call__(self, event):
        getattr(self, "on_" + event["kind"].replace("-", "_"), lambda event: None)(event)

    def on_builtin_data(self, event):
        self.builtin_bar(event["done"], event["total"])

    def on_start(self, event):
        c = event["config"]
        click.echo(f"training on {event['data']}: {event['train_images']} train / {event['val_images']} val "
                   f"images, {event['classes']} classes; {event['params']:,} parameters on "
                   f"{', '.join(event['devices'])}; batch {c['batch_size']}, {c['epochs']} epochs, "
                   f"lr {c['lr']}, init {c['init']}")
        if event["start_epoch"] or event["start_batch"]:
            click.echo(f"resuming at epoch {event['start_epoch'] + 1}, batch {event['start_batch']}")

    def on_step(self, event):
        eta = "" if event.get("eta_run_s") is None else \
            f"  ETA epoch {_clock(event['eta_epoch_s'])}, run {_clock(event['eta_run_s'])}"
        click.echo(f"epoch {event['epoch'] + 1} batch {event['batch']}/{event['batches']}  "
                   f"loss {event['loss']:.4f}  top-1 {100 * event['top1']:5.1f}%  "
                   f"{event['images_per_s']:6.1f} img/s (data {event['rates']['data']:.0f}, step "
                   f"{event['rates']['step']:.0f})  lr {event['lr']:g}{eta}")

    def on_epoch(self, event):
        v = event["val"]
        click.echo(f"epoch {event['epoch'] + 1} validation: loss {v['loss']:.4f}  top-1 {100 * v['top1']:.1f}%  "
                   f"top-5 {100 * v['top5']:.1f}%  (next lr {event['next_lr']:g})")
        if event["finished"]:
            click.echo("validation stopped improving after the last learning-rate drop: done")

    def on_end(self, event):
        if event["skipped"]:
            click.echo(f"skipped {event['skipped']} batch(es) with a NaN or infinite loss or gradient", err=True)
        history, out_dir = event["history"], self.out_dir
        if history["val_top1"]:
            minutes, seconds = divmod(round(event["seconds"]), 60)
            click.echo(f"best validation top-1 {100 * max(history['val_top1']):.1f}% (this run: {minutes} min "
                       f"{seconds} s of training); checkpoints in {out_dir}/ (last.h5, best.h5), curves in "
                       f"{out_dir}/curves.png, metrics in {out_dir}/metrics.jsonl")


@click.group()
@click.version_option(package_name="minidl")
def main():
    """minidl: AlexNet from scratch on NumPy and CuPy."""


@main.command()
@click.argument("model_file", required=False)
@click.option("--data", type=click.Path(), help="A dataset made by `minidl prepare-data` (default: built-in shapes; "
              "with --resume, the run's).")
@click.option("--val-data", type=click.Path(), help="Validate on this dataset (e.g. from prepare-data --labels, with "
              "the classes of --data) instead of --data's validation split; training then takes all of --data.")
@click.option("--devices", help="The two towers' devices, e.g. cuda:0,cuda:1 or cuda:0 or cpu (default: what is here).")
@click.option("--epochs", type=click.IntRange(1), help="Epochs to train (default: the model file's).")
@click.option("--batch-size", type=click.IntRange(1), help="Images per step (default: the model file's).")
@click.option("--out", "out_dir", help="Folder for checkpoints and curves (default: runs/alexnet, or the "
              "folder of the --resume checkpoint); one run at a time writes there.")
@click.option("--resume", type=click.Path(), help="Continue from this checkpoint, on the same data (checked by "
              "content) and with the same model file: MODEL_FILE, or the built-in AlexNet when the run was trained "
              "with it.")
@click.option("--allow-model-change", is_flag=True, help="With --resume: go on with a MODEL_FILE whose source "
              "differs from the one the run was trained with (its weights must still fit).")
@click.option("--seed", type=SEED, help="Seed of every random choice (default: 0, or the resumed run's).")
@click.option("--init", type=click.Choice(["he", "paper"]), help="Initialisation (default: the model file's).")
@click.option("--log-every", type=click.IntRange(1), default=10, show_default=True,
              help="Steps between progress lines.")
@click.option("--checkpoint-seconds", type=NumberRange(0), default=300.0, show_default=True,
              help="Also write last.h5 within an epoch when this long has passed since the last one.")
@click.option("--skip-nonfinite", is_flag=True, help="Skip a batch whose loss or gradient is NaN or infinite "
              "(a rare bad batch) instead of stopping; the count is printed at the end. An update that "
              "overflows still stops the run: the weights have changed.")
@click.option("--data-parallel", is_flag=True, help="Be one rank of `mpirun -n N minidl train ...`: each rank "
              "trains a replica on its share of --batch-size (the global batch); --devices are relative to the "
              "rank's share of its host's GPUs. Needs minidl[mpi].")
@click.option("--workers", type=click.IntRange(0), help="Processes reading and cropping the images (default: the "
              "cores available minus one; 0: a thread of this process). Per rank with --data-parallel.")
@click.option("--loss-scale/--no-loss-scale", default=None, help="Dynamic loss scaling (PyTorch's GradScaler): "
              "backward starts from a scale S (2^16 at first), the update divides by it; a step whose gradients "
              "overflow is skipped and S halves, 2000 clean steps double it. A resumed run keeps its setting.")
@PRECISION
@friendly_errors
def train(model_file, data, val_data, devices, epochs, batch_size, out_dir, resume, allow_model_change, seed, init,
          log_every, checkpoint_seconds, skip_nonfinite, data_parallel, workers, loss_scale, precision):
    """Train MODEL_FILE (e.g. models/alexnet.py); with --resume it may be left out for a run of the built-in
    AlexNet. A checkpoint never chooses the code that runs: a model file comes from this command line only.

    Only rank 0 of a --data-parallel job prints progress (minidl.training.train reports to it alone)."""
    from minidl.training.train import train as run_training
    out_dir = out_dir or (os.path.dirname(os.path.abspath(resume)) if resume else os.path.join("runs", "alexnet"))
    try:
        run_training(model_file, data=data, devices=devices, epochs=epochs, batch_size=batch_size, out_dir=out_dir,
                     resume=resume, seed=seed, init=init, progress=TrainingReport(out_dir), log_every=log_every,
                     checkpoint_seconds=checkpoint_seconds, skip_nonfinite=skip_nonfinite,
                     data_parallel=data_parallel, allow_model_change=allow_model_change, workers=workers, val_data=val_data,
                     precision=precision, loss_scale=loss_scale)
    except KeyboardInterrupt:
        last = os.path.join(out_dir, "last.h5")
        if os.path.exists(last):  # checkpoints are written atomically: the last one is whole
            again = f"minidl train {model_file + ' ' if model_file else ''}--resume {last} --out {out_dir}"
            raise KeyboardInterrupt(f"continue with: {again}") from None
        raise


def _validation_queries(restored, data, batch_size, base, base_labels, k, queries, class_names, note, as_json):
    """(features, labels, pictures, names) of `queries` validation images spread over the split, after
    printing how often the whole split's k nearest training images share its class."""
    import numpy as np

    from minidl.training.predict import dataset_features, dataset_images, nearest
    from minidl.training.visualize import shown_name
    if restored.loader(data, split="val").num_images == 0:
        raise MinidlError(f"{data} has no validation images to query: give --query IMAGE")
    val, val_labels, val_positions = dataset_features(restored, data, "val", batch_size, note=note)
    every, _ = nearest(val, base, k)  # the whole validation set's neighbours, for the agreement
    agreement = float((base_labels[every] == val_labels[:, None]).mean())
    click.echo(f"label agreement: {100 * agreement:.1f}% of the {k} nearest training images share the "
               f"query's class, over all {len(val)} validation images", err=as_json)
    count = min(queries or 4, len(val))
    chosen = np.linspace(0, len(val) - 1, count).round().astype(int)
    q_labels = [int(val_labels[i]) for i in chosen]
    names = [f"val #{int(i)}: {shown_name(class_names[label])}" for i, label in zip(chosen, q_labels)]
    return val[chosen], q_labels, dataset_images(data, val_positions[chosen]), names


def _print_neighbours(rows, k, as_json):
    import json

    from minidl.training.visualize import shown_name
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for row in rows:
        same = "" if row["label"] is None else \
            f"  ({sum(n['label'] == row['label'] for n in row['neighbours'])}/{k} of its class)"
        click.echo(f"{row['query']}: " +
                   ", ".join(f"{shown_name(n['label'])} {n['distance']:.1f}" for n in row["neighbours"]) + same)


@main.command()
@click.argument("checkpoint")
@click.option("--data", required=True, type=click.Path(), help="A dataset made by `minidl prepare-data`.")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="The images to evaluate: the validation split, the training split or both.")
@click.option("--ten-crop", is_flag=True, help="Average the softmax over 4 corners + centre and their mirrors.")
@click.option("--model", "model_file", help="Model file to rebuild the network (default: the built-in AlexNet when "
              "the checkpoint was trained with it).")
@click.option("--devices", help="Devices for the two towers (default: the run's, fitted to this machine).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per forward pass.")
@PRECISION
@friendly_errors
def evaluate(checkpoint, data, split, ten_crop, model_file, devices, batch_size, precision):
    """Top-1 and top-5 accuracy of CHECKPOINT on a dataset."""
    from minidl.precision import set_precision
    from minidl.training.evaluate import check_labels, evaluate as run_evaluation
    from minidl.training.restore import Restored
    set_precision(precision)
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
@click.option("-o", "--output", default="filters.png", show_default=True, help="Picture to write (.png or .jpg).")
@friendly_errors
def visualize_filters(checkpoint, output):
    """Draw conv1's kernels as RGB tiles, one block per tower (the paper's Figure 3)."""
    import numpy as np

    from minidl.training.checkpoint import load_checkpoint
    from minidl.training.visualize import save_filter_grid
    _writable_output(output)
    # the kernels that see the image: 4-D weights over its 3 colour channels, one set per tower;
    # only they are read
    ckpt = load_checkpoint(checkpoint, wanted=lambda name, shape: len(shape) == 4 and shape[1] == 3)
    towers = sorted(ckpt.params)
    if not towers:
        raise MinidlError(f"{checkpoint} has no first-layer convolution (no weights of shape (out, 3, k, k))")
    kernels = np.concatenate([ckpt.params[name] for name in towers])
    save_filter_grid(kernels, output, towers=len(towers))
    click.echo(f"wrote {output}: {len(kernels)} conv1 kernels of {kernels.shape[2]}x{kernels.shape[3]}, "
               f"{len(towers)} tower(s)")


def _writable_output(path):
    """Refuse a picture that cannot be written before the work, not after it: a folder, a missing or
    read-only folder, a suffix that names no picture format."""
    from minidl.training.visualize import picture_format
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise MinidlError(f"cannot write {path}: {folder} is not a writable folder")
    if os.path.isdir(path):
        raise MinidlError(f"cannot write {path}: it is a folder; give a file name, "
                          f"e.g. {os.path.join(path, 'out.png')}")
    picture_format(path)


def _what_the_run_saw(restored, data):
    """(class names, mean image) of a checkpoint; from --data for older checkpoints that lack them.

    A --data given must have as many classes as the checkpoint's model."""
    import json

    from minidl.data import open_dataset
    from minidl.data.dataset import read_class_names
    ckpt = restored.checkpoint
    names, mean = json.loads(ckpt.attrs.get("class_names", "[]")), ckpt.mean_image
    if data is not None:
        with open_dataset(data) as f:
            data_names, data_mean = read_class_names(f), f["mean_image"][()]
        if len(data_names) != ckpt["num_classes"]:
            raise MinidlError(f"{data} has {len(data_names)} classes; the checkpoint's model has "
                              f"{ckpt['num_classes']}")
        if len(names) != ckpt["num_classes"] or mean is None:
            names, mean = data_names, data_mean
    if len(names) != ckpt["num_classes"] or mean is None:
        raise MinidlError(f"{ckpt.path} does not carry its class names and training mean (it is older than "
                          "this minidl): pass --data with the dataset it was trained on")
    return names, mean


@main.command()
@click.argument("checkpoint")
@click.argument("images", nargs=-1, required=True)
@click.option("-o", "--output", default="predictions.png", show_default=True, help="Picture to write (.png or .jpg).")
@click.option("--top", type=click.IntRange(1), default=5, show_default=True, help="Classes per image.")
@click.option("--ten-crop", is_flag=True, help="Average the softmax over the paper's 10 crops.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
@click.option("--data", type=click.Path(), help="The training dataset, for the class names and mean of an older "
              "checkpoint.")
@click.option("--model", "model_file", help="Model file to rebuild the network (default: the built-in AlexNet when "
              "the checkpoint was trained with it).")
@click.option("--devices", help="Devices for the two towers (default: the run's, fitted to this machine).")
@PRECISION
@friendly_errors
def predict(checkpoint, images, output, top, ten_crop, as_json, data, model_file, devices, precision):
    """The top classes of IMAGES (files or folders) under CHECKPOINT, drawn as the paper's Figure 4 (left)."""
    import json

    import numpy as np

    from minidl.precision import set_precision

    from minidl.training.predict import TestInput, find_images, probabilities, read_image, top_k, true_label
    from minidl.training.restore import Restored
    from minidl.training.visualize import draw_predictions, shown_name
    _writable_output(output)
    set_precision(precision)
    restored = Restored(checkpoint, model_file, devices)
    class_names, mean = _what_the_run_saw(restored, data)
    paths = find_images(images)
    pictures = np.stack([read_image(path) for path in paths])
    prepare = TestInput(mean, restored.config["input_size"], restored.input_scale)
    p = np.concatenate([probabilities(restored.model, prepare(pictures[i:i + 32], ten_crop))
                        for i in range(0, len(pictures), 32)])
    if p.shape[1] != len(class_names):  # a model file that ignores build_model's num_classes
        raise MinidlError(f"{restored.model_file.path} builds a model with {p.shape[1]} outputs; the checkpoint "
                          f"has {len(class_names)} classes")
    classes, probs = top_k(p, top)
    truths = [true_label(path, class_names) for path in paths]
    rows = [dict(image=path, true=None if t is None else class_names[t],
                 top=[dict(label=class_names[c], probability=round(float(q), 6)) for c, q in zip(cs, qs)])
            for path, t, cs, qs in zip(paths, truths, classes, probs)]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        for row in rows:
            best = ", ".join(f"{shown_name(t['label'])} {100 * t['probability']:.1f}%" for t in row["top"])
            click.echo(f"{row['image']}: {best}" + (f"  (true: {shown_name(row['true'])})" if row["true"] is not None
                                                    else ""))
    draw_predictions(pictures, [os.path.basename(p) for p in paths], classes, probs, class_names, truths, output)
    click.echo(f"wrote {output}", err=as_json)


@main.command()
@click.argument("checkpoint")
@click.option("--data", required=True, type=click.Path(), help="The dataset whose training images are searched.")
@click.option("--queries", type=click.IntRange(1), help="Query with N validation images, spread over the split "
              "(default: 4 unless --query is given).")
@click.option("--query", "query_images", multiple=True, help="Query with this image file (repeatable).")
@click.option("-k", type=click.IntRange(1), default=6, show_default=True, help="Neighbours per query.")
@click.option("-o", "--output", default="neighbours.png", show_default=True, help="Picture to write (.png or .jpg).")
@click.option("--json", "as_json", is_flag=True, help="Print indices, labels and distances as JSON.")
@click.option("--model", "model_file", help="Model file to rebuild the network (default: the built-in AlexNet when "
              "the checkpoint was trained with it).")
@click.option("--devices", help="Devices for the two towers (default: the run's, fitted to this machine).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Images per forward pass of the training set's features.")
@friendly_errors
def retrieve(checkpoint, data, queries, query_images, k, output, as_json, model_file, devices, batch_size):
    """The training images nearest to each query in the last hidden layer (fc7): the paper's Figure 4 (right)."""
    import numpy as np

    from minidl.training.predict import (TestInput, dataset_features, dataset_images, features, find_images, nearest,
                                         read_image)
    from minidl.training.restore import Restored
    from minidl.training.visualize import draw_neighbours
    _writable_output(output)
    restored = Restored(checkpoint, model_file, devices)
    class_names, mean = _what_the_run_saw(restored, data)
    loader = restored.loader(data, split="train", batch_size=batch_size)  # checks the crop fits its images
    if k > loader.num_images:
        raise MinidlError(f"-k {k} is larger than the training set of {data} ({loader.num_images} images)")
    note = lambda line: click.echo(f"note: {line}", err=True)  # noqa: E731
    base, base_labels, base_positions = dataset_features(restored, data, "train", batch_size,
                                                         progress=ProgressLine("fc7 features of the training set"),
                                                         note=note)
    if query_images:
        paths = find_images(query_images)
        pictures = np.stack([read_image(path) for path in paths])
        prepare = TestInput(mean, restored.config["input_size"], restored.input_scale)
        q = features(restored.model, prepare(pictures))
        names, q_labels = [os.path.basename(p) for p in paths], [None] * len(paths)
    else:
        q, q_labels, pictures, names = _validation_queries(restored, data, batch_size, base, base_labels, k,
                                                           queries, class_names, note, as_json)
    indices, distances = nearest(q, base, k)
    rows = [dict(query=name, label=None if label is None else class_names[label],
                 neighbours=[dict(index=int(base_positions[i]), label=class_names[int(base_labels[i])],
                                  distance=round(float(d), 4)) for i, d in zip(row_i, row_d)])
            for name, label, row_i, row_d in zip(names, q_labels, indices, distances)]
    _print_neighbours(rows, k, as_json)
    neighbour_pictures = dataset_images(data, base_positions[indices.reshape(-1)]).reshape(
        indices.shape + (loader.image_size, loader.image_size, 3))
    draw_neighbours(pictures, names, neighbour_pictures, [[class_names[int(base_labels[i])] for i in row]
                                                          for row in indices], output)
    click.echo(f"wrote {output}", err=as_json)


@main.command()
@click.argument("checkpoint")
@click.option("-o", "--output", required=True, help="File to write: .onnx (an ONNX graph, preprocessing and "
              "softmax inside; needs minidl[export]) or .npz (the weights and preprocessing as plain arrays).")
@click.option("--model", "model_file", help="Model file to rebuild the network for ONNX (default: the built-in "
              "AlexNet when the checkpoint was trained with it).")
@friendly_errors
def export(checkpoint, output, model_file):
    """Write CHECKPOINT's network for other frameworks: ONNX Runtime (.onnx) or plain arrays (.npz)."""
    from minidl.training.export import export as run_export
    result = run_export(checkpoint, output, model_file)
    if result["format"] == "onnx":
        click.echo(f"wrote {output}: ONNX opset {result['opset']}, {result['nodes']} nodes; input "
                   f"{result['input'][0]} (N, {', '.join(map(str, result['input'][1:]))}) float32 RGB 0..255, "
                   "output probabilities")
    else:
        click.echo(f"wrote {output}: {result['arrays']} arrays")


@main.command()
@click.argument("model_file")
@click.option("--classes", type=click.IntRange(1, MAX_CLASSES), default=1000, show_default=True,
              help="Classes of the last layer (at most the 10^6 a dataset or checkpoint may hold).")
@click.option("--devices", help="Devices for the two towers (default: the model file's, fitted to this machine).")
@friendly_errors
def summary(model_file, classes, devices):
    """Each layer of MODEL_FILE with its device, output shape and parameters."""
    from minidl.layers import summary as layer_summary
    from minidl.training.model_file import load_model_file
    mf = load_model_file(model_file)
    model = mf.build(classes, devices)
    size = mf.config["input_size"]
    click.echo(layer_summary(model, (1, 3, size, size), device=model.input_device))


@main.command()
@click.argument("model_file")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True,
              help="Images per step (refused if it does not fit in memory).")
@click.option("--devices", help="Devices for the two towers (default: what is here).")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True,
              help="Timed steps (after 3 warm-up steps).")
@PRECISION
@friendly_errors
def bench(model_file, batch_size, devices, steps, precision):
    """Time full training steps of MODEL_FILE on synthetic data."""
    from minidl.training.bench import bench as run_bench
    from minidl.training.model_file import load_model_file
    result = run_bench(load_model_file(model_file), batch_size=batch_size, steps=steps, devices=devices,
                       progress=ProgressLine("steps"), precision=precision)
    click.echo(f"devices {','.join(result['devices'])}  batch {result['batch_size']}  "
               f"median of {result['steps']} steps: {result['ms_per_step']:.1f} ms/step  "
               f"{result['images_per_s']:.1f} images/s  peak memory {_size(result['peak_memory_bytes'])}")
    work = result.get("device_work_per_step")
    if work is not None:
        kinds = ", ".join(f"{work.get(kind, 0):.0f} {kind}" for kind in ("kernel", "elementwise", "reduction",
                                                                        "gemm", "copy"))
        click.echo(f"device operations per step (emulated GPUs): {sum(v for k, v in work.items() if k != 'bytes'):.0f} "
                   f"({kinds}), moving {_size(work.get('bytes', 0))}")


@main.command("bench-data")
@click.argument("data", type=click.Path())
@click.option("--workers", type=click.IntRange(0), help="Processes reading and cropping the images (default: the "
              "cores available minus one; 0: a thread of this process).")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True, help="Images per batch.")
@click.option("--devices", default="cpu", show_default=True, help="Where the batches are delivered: cpu or cuda:N.")
@click.option("--batches", type=click.IntRange(2), default=30, show_default=True,
              help="Batches to deliver (at most the training split's).")
@friendly_errors
def bench_data(data, workers, batch_size, devices, batches):
    """Time the training loader on DATA (the paper's augmentation, as `minidl train` loads it): images/s
    delivered to the device, CPU per image (every process), peak memory."""
    from minidl.data.bench import bench_data as run_bench_data
    if "," in devices:
        raise MinidlError(f"--devices {devices}: bench-data delivers to one device, e.g. cpu or cuda:0")
    r = run_bench_data(data, workers=workers, batch_size=batch_size, device=devices, batches=batches)
    click.echo(f"{r['batches']} batches of {r['batch_size']} ({r['crop']}x{r['crop']} crops) to {r['device']} with "
               f"{r['workers']} worker(s): {r['images_per_s']:,.0f} images/s  {r['cpu_ms_per_image']:.2f} ms CPU per "
               f"image  peak memory {_size(r['peak_memory_bytes'])} (this process), "
               f"{_size(r['worker_peak_memory_bytes'])} (largest worker)")


def _size(nbytes):
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


@main.command("prepare-data")
@click.argument("image_dir")
@click.argument("out")
@click.option("--workers", type=click.IntRange(1), help="Decoding processes (default: all cores).")
@click.option("--val-fraction", type=NumberRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Share of each class held out for validation, between 0 and 1 (both "
              "excluded); every class of two images or more keeps at least one for validation and one for training.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the train/val split.")
@click.option("--storage", type=click.Choice(["raw", "gzip", "jpeg"]), default="raw", show_default=True,
              help="How the images are kept: raw (0.1 ms of CPU to read one, 197 kB), jpeg (0.6 ms, about 23 kB, "
              "lossy: quality 90) or gzip (0.9 ms, about 154 kB; the files of earlier versions).")
@click.option("--labels", "labels_file", type=click.Path(), help="IMAGE_DIR is a flat folder of images and this "
              "file labels them (FILENAME LABEL lines, or one LABEL per line in sorted file order; a LABEL is a "
              "class name or a 0-based class index): OUT holds them all for validation. Needs --classes-from.")
@click.option("--classes-from", type=click.Path(), help="With --labels: the training dataset whose classes (and "
              "statistics) OUT takes, so that its labels mean the same classes.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (by default an existing OUT is refused).")
@friendly_errors
def prepare_data(image_dir, out, workers, val_fraction, seed, storage, labels_file, classes_from, overwrite):
    """Turn IMAGE_DIR (one subfolder per class) into the HDF5 dataset OUT. An interrupted run keeps what it
    wrote (beside OUT, in .OUT.partial): the same command continues from it."""
    from minidl.data import prepare_image_folder
    try:
        with PassProgress() as progress:
            result = prepare_image_folder(image_dir, out, workers=workers, val_fraction=val_fraction, seed=seed,
                                          progress=progress, overwrite=overwrite, storage=storage,
                                          labels_file=labels_file, classes_from=classes_from)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("what was written is kept: the same command continues from it") from None
    click.echo(f"wrote {out}: {result.written} images in {len(result.class_counts)} classes")
    if result.empty_folders:
        click.echo(f"left out {len(result.empty_folders)} class folder(s) without files: "
                   f"{', '.join(map(repr, result.empty_folders[:20]))}", err=True)
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} unreadable image(s):", err=True)
        for path, reason in result.skipped[:20]:
            click.echo(f"  {path}: {reason}", err=True)


def program():
    """The `minidl` program: main, as a process of its own, whose exit after Ctrl-C or an error is bounded
    (_end_within; not in main itself, which tests and embedders call in their own process)."""
    try:
        main()
    except SystemExit as done:
        if done.code and not _world():  # a data-parallel rank's exit is MPI's to end (see _say_error)
            _end_within(EXIT_GRACE_SECONDS, done.code)
        raise


if __name__ == "__main__":
    program()
