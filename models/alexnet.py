"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) and its training recipe, as a model file.

A model file (what `minidl train MODEL_FILE` reads) defines CONFIG, the training recipe (a dict);
optionally BUILTIN_DATA, CONFIG's overrides for the built-in dataset; and build_model(num_classes,
devices, init, seed) -> Layer, whose forward maps images (N, 3, S, S), S = CONFIG["input_size"], to
logits (N, num_classes) on `model.output_device`; the trainer puts each batch on `model.input_device`
(here the first tower's device: the second tower gets the image from it, GPU to GPU).
The network is the paper's two towers, one per device (NETWORK is the whole device split).
`init="he"` (the default) learns small data within minutes; `init="paper"` is the paper's own.
"""
from minidl.functions import concat_to, exchange
from minidl.layers import (LRN, Branches, Conv2d, Dropout, Flatten, Layer, Linear, MaxPool2d, ReLU, Sequential,
                           init, stacked_conv2d)
from minidl.layers.layer import make_rng

CONFIG = dict(
    input_size=227,          # the paper says 224; only 227 gives its 55x55 conv1 maps
    batch_size=128,
    epochs=90,
    lr=0.01,
    momentum=0.9,
    weight_decay=0.0005,
    lr_drop_factor=10,       # divide the learning rate by this when validation stalls,
    lr_drops=3,              # at most this many times, then stop
    plateau_patience=2,      # epochs without a better validation error before a drop
    dropout=0.5,
    init="he",
    # pixels are 0..255 minus the mean, as in the paper; He-initialised weights expect
    # unit-scale input (at 0..255 the first steps blow the loss up), so they get x/255
    input_scale=dict(paper=1.0, he=1 / 255),
    devices=("cuda:0", "cuda:1"),
)

# The built-in shapes dataset on a 2-core CPU: a run that shows learning in minutes. Four
# epochs, not three: the third ends in the steep part of the learning curve, where the seed
# alone decides between 74% and 88% (benchmarks/NOTES.md); after the fourth, 80-93%.
BUILTIN_DATA = dict(batch_size=32, epochs=4)

# Each row is one layer in each tower; "reads" is its input: "image" the input image (each tower gets its
# own copy), "own" only the tower's own maps, "both" both towers' maps, a crossing between devices (a
# concat_to). fc8 is one layer on the first device reading both towers.
#  name     kind  per tower (x2)                                reads    then
NETWORK = [
    ("conv1", "conv", dict(out=48, ksize=11, stride=4, pad=0), "image", "relu lrn pool"),
    ("conv2", "conv", dict(out=128, ksize=5, pad=2),           "own",   "relu lrn pool"),
    ("conv3", "conv", dict(out=192, ksize=3, pad=1),           "both",  "relu"),
    ("conv4", "conv", dict(out=192, ksize=3, pad=1),           "own",   "relu"),
    ("conv5", "conv", dict(out=128, ksize=3, pad=1),           "own",   "relu pool flatten"),
    ("fc6",   "fc",   dict(out=2048),                          "both",  "relu dropout"),
    ("fc7",   "fc",   dict(out=2048),                          "both",  "relu dropout"),
]
CLASSIFIER_READS = "both"  # fc8: num_classes outputs on the first device
BIAS_ONE = {"conv2", "conv4", "conv5", "fc6", "fc7"}  # the paper's biases of 1
POOLED_SIZE = 6  # conv5's maps after the last pool: 256 x 6 x 6 = 9216 inputs to fc6


# Training keeps about this many bytes per byte of layer output (Layer.training_bytes_per_output_byte):
# measured at batch 32 on the CPU, a 2.15 GiB peak = 3 x the parameters + about 6 x the outputs when each ReLU
# was a layer of its own; with ReLU inside the conv and fc layers (activation="relu") the same memory is about
# 9 x the outputs of the layers that remain.
TRAINING_BYTES_PER_OUTPUT_BYTE = 9


def initialisers(name, scheme):
    """(W_init, b_init) for a layer under `scheme` ("paper" or "he")."""
    # "paper": N(0, 0.01^2) weights, biases 1 in BIAS_ONE. It has a long flat start on small data (the loss
    # sits at ln(classes) for tens of thousands of images); "he", He/Kaiming normal weights and zero biases,
    # learns the built-in data within minutes on a CPU.
    if scheme == "paper":
        return init.normal(0.01), init.constant(1.0 if name in BIAS_ONE else 0.0)
    if scheme == "he":
        return init.he_normal(), init.zeros
    raise ValueError(f"unknown init {scheme!r}: use 'paper' or 'he'")


def after_layers(ops, device, dropout):
    makers = dict(relu=lambda: ReLU(device=device), lrn=lambda: LRN(device=device),
                  pool=lambda: MaxPool2d(3, 2, device=device), flatten=lambda: Flatten(device=device),
                  dropout=lambda: Dropout(dropout, device=device))
    return Sequential(*[makers[op]() for op in ops.split()])


class Tower(Layer):
    """Half of every layer's filters, on one device."""

    def __init__(self, device, scheme, rng, dropout, network, pooled_size):
        super().__init__(device)
        channels = 3
        for name, kind, spec, reads, then in network:
            in_channels = 2 * channels if reads == "both" else channels  # features, for a fully connected layer
            W_init, b_init = initialisers(name, scheme)
            # a ReLU right after the layer runs in the layer's own pass, with its bias; after a fully connected
            # layer's ReLU, dropout too (one kernel each way for the three)
            ops = then.split()
            activation = "relu" if ops[:1] == ["relu"] else None
            drops = kind == "fc" and ops[:2] == ["relu", "dropout"]
            then = " ".join(ops[2 if drops else 1 if activation else 0:])
            if kind == "conv":
                layer = Conv2d(in_channels, spec["out"], spec["ksize"], spec.get("stride", 1), spec.get("pad", 0),
                               device=device, W_init=W_init, b_init=b_init, rng=rng, activation=activation)
            else:
                layer = Linear(in_channels, spec["out"], device=device, W_init=W_init, b_init=b_init, rng=rng,
                               activation=activation, dropout=dropout if drops else 0.0)
            channels = spec["out"]
            if "flatten" in then:
                channels *= pooled_size * pooled_size
            setattr(self, name, layer)
            setattr(self, name + "_then", after_layers(then, device, dropout))
        self.out_features = channels

    def stage(self, name, x):
        return self.after(name, getattr(self, name)(x))

    def after(self, name, y):
        """What follows layer `name` (its "then" column) applied to its output y."""
        return getattr(self, name + "_then")(y)


class AlexNet(Layer):
    """The two-tower network; `network` and `pooled_size` let tests build a small one."""

    training_bytes_per_output_byte = TRAINING_BYTES_PER_OUTPUT_BYTE

    def __init__(self, num_classes=1000, devices=("cuda:0", "cuda:1"), init="he", seed=0, dropout=0.5,
                 network=NETWORK, pooled_size=POOLED_SIZE):
        super().__init__(device=None)
        rng = make_rng(seed)
        self.network = network
        self.tower0 = Tower(devices[0], init, rng, dropout, network, pooled_size)
        self.tower1 = Tower(devices[1], init, rng, dropout, network, pooled_size)
        self.towers = Branches(self.tower0, self.tower1)  # on the CPU they run side by side, a core each
        W_init, b_init = initialisers("fc8", init)
        self.fc8 = Linear(2 * self.tower0.out_features, num_classes, device=devices[0],
                          W_init=W_init, b_init=b_init, rng=rng)
        self.output_device = self.fc8.device
        # the loader uploads 1 byte a value (pinned) and makes the float input there; the second tower's copy
        # goes GPU to GPU (CuPy enables peer access where the GPUs allow it: NVLink on an H100 board)
        self.input_device = self.tower0.device

    def forward(self, image):
        # every crossing between the towers is visible here: an exchange (on two GPUs that reach each other's
        # memory, one kernel a GPU each way, reading across NVLink; else a copy into each slice), and a concat_to
        # onto fc8's device; on one device, one concatenate
        devices = [t.device for t in self.towers]
        xs = [image.to(d) for d in devices]  # both towers read the image (on one device, the same one)
        for name, kind, _, reads, _ in self.network:
            if reads == "both":  # made once per device: on one device both towers read the same maps
                xs = exchange(xs, axis=1)
            stacked = reads == "image" or (reads == "both" and devices[0].is_cuda)
            if kind == "conv" and len(set(devices)) == 1 and stacked:
                # one device, both towers reading the same maps: their filters as one convolution (the
                # patches gathered once, one product twice as tall, one input gradient; benchmarks/NOTES.md).
                # conv3 only on a GPU, where it saves launches: the CPU runs its towers side by side, a core each
                ys = stacked_conv2d([getattr(t, name) for t in self.towers], xs[0])
                xs = self.towers.map(lambda tower, y: tower.after(name, y), ys)
            else:
                xs = self.towers.map(lambda tower, x: tower.stage(name, x), xs)
        return self.fc8(concat_to(xs, self.fc8.device, axis=1))


def build_model(num_classes=1000, devices=("cuda:0", "cuda:1"), init="he", seed=0):
    return AlexNet(num_classes, devices, init, seed, CONFIG["dropout"])
