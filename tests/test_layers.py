"""Layer objects: parameter registry, names, modes, placement, initialisers."""
import numpy as np
import pytest

from minidl import Tensor
from minidl.atomic import atomic_path
from minidl.layers import LRN, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential, init


def small_net():
    return Sequential(Conv2d(3, 4, 3, pad=1, rng=0), ReLU(), LRN(), MaxPool2d(3, 2), Flatten(),
                      Linear(4 * 3 * 3, 5, rng=1), Dropout(0.5))


def test_params_and_stable_dotted_names():
    net = small_net()
    assert [n for n, _ in net.named_params()] == ["0.W", "0.b", "5.W", "5.b"]
    assert net.num_params() == 4 * 3 * 9 + 4 + 36 * 5 + 5
    assert all(p.requires_grad for p in net.params())


def test_forward_backward_and_zero_grad():
    net = small_net().eval()
    y = net(Tensor(np.random.default_rng(0).standard_normal((2, 3, 7, 7)).astype(np.float32)))
    assert y.shape == (2, 5)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in net.params())
    net.zero_grad()
    assert all(p.grad is None for p in net.params())


def test_train_and_eval_reach_every_layer():
    net = small_net()
    assert all(layer.training for _, layer in net.named_layers())
    net.eval()
    assert not any(layer.training for _, layer in net.named_layers())
    x = Tensor(np.ones((1, 4)))
    assert Dropout(0.5).eval()(x) is x


def test_to_dtype_keeps_values():
    net = small_net()
    before = net.params()[0].numpy()
    net.to(dtype=np.float64)
    assert net.params()[0].dtype == np.float64
    np.testing.assert_array_equal(net.params()[0].numpy(), before)


def test_initialisers():
    rng = np.random.default_rng(0)
    w = init.normal(0.01)((200, 300), rng)
    assert w.dtype == np.float32 and abs(w.std() - 0.01) < 2e-4
    assert np.all(init.constant(1.0)((3,), rng) == 1.0)
    he = init.he_normal()((64, 32, 3, 3), rng)
    assert abs(he.std() - np.sqrt(2 / (32 * 9))) < 2e-3
    layer = Linear(3, 2, W_init=init.constant(0.5), b_init=init.constant(1.0))
    assert np.all(layer.W.data == 0.5) and np.all(layer.b.data == 1.0)


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "ckpt.h5"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ckpt.h5"]
    with atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new"


def test_to_moves_in_place_so_an_optimizer_made_before_follows(dev):
    from minidl.functions import softmax_cross_entropy
    from minidl.optim import MomentumSGD
    net = small_net().eval()
    params = net.params()
    optimizer = MomentumSGD(params, lr=0.1)
    x = np.random.default_rng(1).standard_normal((2, 3, 7, 7)).astype(np.float32)
    softmax_cross_entropy(net(Tensor(x)), np.array([0, 1])).backward()
    optimizer.step()  # a velocity on the CPU
    net.to(dev)
    assert net.params() == params and all(p.device is dev for p in params)  # the same objects, moved
    before = [p.numpy() for p in params]
    softmax_cross_entropy(net(Tensor(x, device=dev)), np.array([0, 1])).backward()
    optimizer.step()
    assert all(not np.array_equal(p.numpy(), b) for p, b in zip(params, before))
    assert all(v.device is dev for v in optimizer.velocities)


def test_a_layer_can_be_called_from_another_thread():
    import threading
    from minidl.layers import summary
    net, out, errors = small_net().eval(), [], []

    def work():
        try:
            out.append(net(Tensor(np.ones((1, 3, 7, 7), np.float32))).shape)
            out.append(summary(net, (1, 3, 7, 7)))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors and out[0] == (1, 5) and "Linear(36->5)" in out[1]


def test_each_dropout_layer_draws_its_own_masks():
    from minidl.layers import seed_dropout
    x = Tensor(np.ones((50, 40), np.float32))
    a, b = Dropout(0.5), Dropout(0.5)
    first = a(x).numpy()
    assert not np.array_equal(first, b(x).numpy())  # unseeded layers draw different masks
    assert not np.array_equal(first, Dropout(0.5, seed=1)(x).numpy())
    seeded = Dropout(0.5, seed=7)
    first = seeded(x).numpy()
    b(x)  # another layer drawing does not move this one's stream
    seeded.generator.seed(7)
    np.testing.assert_array_equal(seeded(x).numpy(), first)
    # seed_dropout reseeds per layer name: the same seed gives each layer its own masks, repeatably
    net = Sequential(Dropout(0.5), Dropout(0.5))
    seed_dropout(net, 3)
    masks = [layer(x).numpy() for layer in net]
    seed_dropout(net, 3)
    assert not np.array_equal(masks[0], masks[1])
    np.testing.assert_array_equal([layer(x).numpy() for layer in net][0], masks[0])


@pytest.mark.gpu
def test_to_dtype_casts_on_the_layers_own_gpu():
    """A layer on cuda:1 cast while cuda:0 is current: the cast runs under cuda:1, as CuPy requires."""
    import minidl
    if minidl.gpu_count() < 2:
        pytest.skip("needs two GPUs (or --emulate-gpus 2)")
    from minidl.device import device
    net = small_net().to("cuda:1")
    before = net.params()[0].numpy()
    with device("cuda:0"):
        net.to(dtype=np.float64)
    assert all(p.dtype == np.float64 and p.device is device("cuda:1") for p in net.params())
    np.testing.assert_array_equal(net.params()[0].numpy(), before)


def test_stacked_convolutions_equal_one_call_each(dev):
    from minidl.layers import stacked_conv2d
    rng = np.random.default_rng(4)
    convs = [Conv2d(3, out, 5, 2, 1, device=dev, rng=rng, b_init=init.normal(0.5)).to(dtype=np.float64)
             for out in (4, 6)]
    x = rng.standard_normal((2, 3, 11, 11))
    gys = [rng.standard_normal((2, out, 5, 5)) for out in (4, 6)]
    hooked = []
    convs[1].register_forward_hook(lambda layer, inputs, y: hooked.append((layer, y.shape)))

    def run(stacked):
        for conv in convs:
            conv.zero_grad()
        xt = Tensor(x, requires_grad=True, device=dev)
        ys = stacked_conv2d(convs, xt) if stacked else [conv(xt) for conv in convs]
        sum((y * Tensor(g, device=dev)).sum() for y, g in zip(ys, gys)).backward()
        return [y.numpy() for y in ys] + [xt.grad.numpy()] + [p.grad.numpy() for c in convs for p in c.params()]
    for stacked, separate in zip(run(True), run(False)):
        np.testing.assert_allclose(stacked, separate, rtol=1e-12, atol=1e-12)
    assert hooked == [(convs[1], (2, 6, 5, 5))] * 2  # the layer's hook saw its own output both ways


def test_stacked_convolutions_of_other_geometries_are_called_one_by_one():
    from minidl.layers import stacked_conv2d
    x = Tensor(np.ones((1, 3, 9, 9), np.float32))
    ys = stacked_conv2d([Conv2d(3, 2, 3), Conv2d(3, 4, 5)], x)  # two kernel sizes: no one convolution
    assert [y.shape for y in ys] == [(1, 2, 7, 7), (1, 4, 5, 5)]
    grouped = [Conv2d(4, 2, 3, groups=2), Conv2d(4, 2, 3, groups=2)]
    assert [y.shape for y in stacked_conv2d(grouped, Tensor(np.ones((1, 4, 5, 5), np.float32)))] == [(1, 2, 3, 3)] * 2


@pytest.mark.gpu
def test_stacked_convolutions_refuse_an_input_on_another_device():
    from minidl.errors import MinidlError
    from minidl.layers import stacked_conv2d
    with pytest.raises(MinidlError, match="lives on cuda:0 but got an input on cpu"):
        stacked_conv2d([Conv2d(3, 2, 3, device="cuda:0")] * 2, Tensor(np.ones((1, 3, 9, 9), np.float32)))


def test_the_training_memory_estimate_takes_the_models_bytes_per_output_byte():
    from minidl.layers.summary import training_memory

    class Measured(Sequential):
        training_bytes_per_output_byte = 12
    layers = (Flatten(), Linear(3 * 4 * 4, 5, rng=0))
    (default, fixed), = training_memory(Sequential(*layers), (3, 4, 4)).values()
    (measured, same_fixed), = training_memory(Measured(*layers), (3, 4, 4)).values()
    assert measured == 2 * default and same_fixed == fixed
