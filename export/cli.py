"""`keras-bn`: inspect / fold / export / verify / demo. Parses arguments, calls the library,
formats results. Exit codes: 0 success, 1 verification failed (or, for doctor, a problem found), 2
bad input or usage, 70 internal error (a bug of keras-bn: please report it with --debug output)."""

import argparse
import json
import os
import signal
import sys
import threading
import traceback

from keras_bn import _console

from .steps import Step

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 70  # 70: EX_SOFTWARE


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"keras-bn: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _positive_float(text):
    """An argparse type: a finite number > 0 (`nan`, `inf`, 0 and negatives are usage errors)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _positive_int(text):
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _load_samples(path, args, what="samples file"):
    from .files import ArrayLimits, GiB, load_arrays

    if path is None:
        return None
    limits = ArrayLimits(max_total_bytes=int(args.max_samples_gib * GiB))
    return load_arrays(path, what, limits)


def _input_shapes(args):
    """--input-shape values ("10100,4", or "name=10100,4" per input) as the library takes them:
    one shape, a list in the model's input order, or a dict by input name."""
    from keras_bn.errors import KerasBNError, expected

    values = getattr(args, "input_shape", None)
    if not values:
        return None
    shapes, named = [], {}
    for value in values:
        name, _, dims = value.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not shape:
            raise KerasBNError(
                expected(
                    "Invalid --input-shape",
                    "the shape of one sample without the batch axis, such as 10100,4 or "
                    "name=224,224,3 for a named input",
                    repr(value),
                )
            )
        if name:
            named[name] = shape
        else:
            shapes.append(shape)
    if named and shapes:
        raise KerasBNError(
            expected("--input-shape values are all named or none", "name=dims for every input "
                     "or for none", f"{values}")
        )  # fmt: skip
    return named or (shapes[0] if len(shapes) == 1 else shapes)


def _load(args):
    from .files import ArchiveLimits, GiB, load_model_file

    limits = ArchiveLimits(max_total_bytes=int(args.max_archive_gib * GiB))
    with Step(f"loading {args.model}"):
        return load_model_file(args.model, unsafe=args.unsafe, limits=limits)


def _require_extra(extra, command):
    from keras_bn import _environment

    _environment.require_extra(extra, command)


def _bn_rows(model):
    from keras_bn import _keras_internals as internals
    from keras_bn.conventions import keras_momentum_to_torch
    from keras_bn.fold import BATCHNORM_TYPES

    rows = []
    for layer in internals.all_layers(model):
        if isinstance(layer, BATCHNORM_TYPES):
            torch_momentum = keras_momentum_to_torch(layer.momentum)
            rows.append(
                {
                    "name": layer.name,
                    "type": type(layer).__name__,
                    "axis": layer.axis,
                    "momentum_keras": layer.momentum,
                    "momentum_torch": None if torch_momentum is None else round(torch_momentum, 12),
                    "epsilon": layer.epsilon,
                    "moving_variance": "unbiased"
                    if getattr(layer, "unbiased_variance", False)
                    else "biased",
                }
            )
    return rows


def cmd_inspect(args):
    import keras_bn

    model = _load(args)
    with Step("planning the fold"):
        _, report = keras_bn.fold_bn(model, verify=False)
    rows = _bn_rows(model)
    if args.json:
        print(
            json.dumps(
                {"model": model.name, "batchnorms": rows, "fold_plan": report.to_dict()}, indent=2
            )
        )
        return EXIT_OK
    print(f"model {model.name}: {len(model.layers)} layers, {len(rows)} BatchNorm(s)")
    print(
        f"{'BatchNorm':<28} {'type':<20} {'axis':>4} {'momentum (Keras / PyTorch)':>28} {'epsilon':>9}  moving var"
    )
    for r in rows:
        momentum = (
            "cumulative"
            if r["momentum_keras"] is None
            else f"{r['momentum_keras']:g} / {r['momentum_torch']:g}"
        )
        print(
            f"{r['name']:<28} {r['type']:<20} {r['axis']:>4} {momentum:>28} {r['epsilon']:>9.3g}  {r['moving_variance']}"
        )
    print()
    print("fold plan:")
    print(report)
    return EXIT_OK


def _write_keras(model, output, report, args):
    """Writes `model` to `output` atomically and prints `report` (or JSON with --json)."""
    from .files import atomic_output, save_keras

    with Step(f"writing {output}"):
        with atomic_output(output, ".keras") as handle:
            save_keras(model, handle)
    if args.json:
        print(json.dumps({"output": output, **report.to_dict()}, indent=2))
    else:
        print(report)
        print(f"wrote {output}")
    return EXIT_OK


def cmd_fold(args):
    import keras_bn

    from .files import check_output_path

    output = check_output_path(args.output, inputs=[args.model, args.samples], suffix=".keras")
    model = _load(args)
    samples = _load_samples(args.samples, args)
    with Step("folding and verifying"):
        folded, report = keras_bn.fold_bn(
            model,
            samples=samples,
            rtol=args.rtol,
            atol=args.atol,
            on_bad_statistics="raise",
            input_shapes=_input_shapes(args),
        )
    return _write_keras(folded, output, report, args)


def cmd_export(args):
    if str(args.output).lower().endswith(".tflite"):
        return _export_litert(args)
    _require_extra("onnx", "keras-bn export")
    from keras_bn import export
    from keras_bn.errors import KerasBNError, expected

    if args.int8_io:
        raise KerasBNError(
            expected("--int8-io is for LiteRT files", "an output ending in .tflite", args.output)
        )

    from .convert import check_opset
    from .files import check_output_path

    check_output_path(
        args.output,
        inputs=[args.model, args.samples, args.calibration, args.labels],
        suffix=".onnx",
    )
    check_opset(args.opset)
    model = _load(args)
    samples = _load_samples(args.samples, args)
    calibration = _load_samples(args.calibration, args, "calibration file")
    labels = _load_samples(args.labels, args, "labels file")
    report = export.to_onnx(
        model,
        args.output,
        fold=not args.no_fold,
        opset=args.opset,
        samples=samples,
        atol=args.atol,
        rtol=args.rtol,
        nchw_inputs=args.nchw,
        verbose=1,
        on_bad_statistics="raise",
        precision=args.precision,
        calibration=calibration,
        calibrate_method=args.calibrate_method,
        labels=labels,
        min_agreement=args.min_agreement,
        min_cosine=args.min_cosine,
        keep_float=args.keep_float,
        reduce_range={"auto": None, "on": True, "off": False}[args.reduce_range],
        input_shapes=_input_shapes(args),
        measure_latency=args.benchmark,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EXIT_OK


# ONNX-only options, refused with a .tflite output rather than ignored.
ONNX_ONLY = {
    "opset": None,
    "nchw": False,
    "keep_float": [],
    "reduce_range": "auto",
    "benchmark": False,
    "calibrate_method": "minmax",
}


def _export_litert(args):
    _require_extra("litert", "keras-bn export to LiteRT")
    from keras_bn.errors import KerasBNError, expected

    from .files import check_output_path
    from .litert import to_litert

    given = [k for k, default in ONNX_ONLY.items() if getattr(args, k) != default]
    if given or (args.int8_io and args.precision != "int8"):
        options = ", ".join("--" + k.replace("_", "-") for k in given) or "--int8-io"
        raise KerasBNError(
            expected(
                "These options do not apply to a LiteRT (.tflite) export",
                "--precision, --calibration, --samples, --labels, --min-agreement, "
                "--min-cosine, --input-shape, --atol, --rtol, --no-fold (--int8-io with int8)",
                options,
            )
        )
    check_output_path(
        args.output, inputs=[args.model, args.samples, args.calibration, args.labels],
        suffix=".tflite",
    )  # fmt: skip
    model = _load(args)
    samples = _load_samples(args.samples, args)
    calibration = _load_samples(args.calibration, args, "calibration file")
    labels = _load_samples(args.labels, args, "labels file")
    with Step("folding, converting to LiteRT and verifying"):
        report = to_litert(
            model, args.output, precision=args.precision, calibration=calibration,
            samples=samples, labels=labels, fold=not args.no_fold, int8_io=args.int8_io,
            atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement,
            min_cosine=args.min_cosine, input_shapes=_input_shapes(args),
            on_bad_statistics="raise",
        )  # fmt: skip
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EXIT_OK


def cmd_verify(args):
    _require_extra("onnx", "keras-bn verify")
    from keras_bn import export

    from .files import check_regular_file
    from .onnx_file import OnnxLimits

    limits = OnnxLimits(max_memory_gib=args.max_onnx_gib, max_seconds=args.max_onnx_seconds)
    check_regular_file(args.onnx, "ONNX file")
    model = _load(args)
    samples = _load_samples(args.samples, args)
    with Step("running Keras and onnxruntime"):
        report = export.verify(
            model,
            args.onnx,
            samples=samples,
            atol=args.atol,
            rtol=args.rtol,
            input_shapes=_input_shapes(args),
            limits=limits,
        )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EXIT_OK if report.passed else EXIT_VERIFY_FAILED


def cmd_recalibrate(args):
    import keras_bn

    from . import launcher
    from .files import check_output_path

    output = check_output_path(args.output, inputs=[args.model, args.data], suffix=".keras")
    run = launcher.join()
    with run.scope():
        model = _load(args)
        data = run.rows(_load_samples(args.data, args, "data file"))
        with Step("recalibrating"):
            new, report = keras_bn.recalibrate(
                model,
                data,
                batch_size=args.batch_size,
                estimator=args.estimator,
                verbose=0 if args.json else 1,
            )
        if run.rank == 0:  # every process holds the same statistics: one writes them
            return _write_keras(new, output, report, args)
    if args.json:
        print(json.dumps({"output": None, "written_by_process": 0, **report.to_dict()}, indent=2))
    else:
        print(report)
        print(f"process {run.rank} of {run.count}: process 0 writes {output}")
    return EXIT_OK


def cmd_doctor(args):
    import keras_bn

    from . import launcher

    run = launcher.join()
    with run.scope():
        model = _load(args)
        data = run.rows(_load_samples(args.data, args, "data file"))
        with Step("diagnosing" + (" with data" if data is not None else "")):
            report = keras_bn.diagnose(model, data, batch_size=args.batch_size)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EXIT_OK if report.healthy else EXIT_VERIFY_FAILED


def cmd_demo(args):
    _require_extra("demo", "keras-bn demo")
    from .demo import run_demo

    summary = run_demo(args.out, epochs=args.epochs, verbose=not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
    return EXIT_OK


def _version():
    import importlib.metadata

    try:
        return importlib.metadata.version("keras-bn")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def build_parser():
    parser = _Parser(
        prog="keras-bn",
        description="BatchNorm tooling for Keras 3: inspect, fold, "
        "export to ONNX (verified against onnxruntime).",
    )
    parser.add_argument("--version", action="version", version=f"keras-bn {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--verbose", action="store_true", help="keep TensorFlow's C++ log lines on stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, model=True, tolerances=True):
        if model:
            p.add_argument("model", help="a .keras file (loaded with safe_mode=True)")
            p.add_argument(
                "--unsafe",
                action="store_true",
                help="allow legacy .h5 files, whose loader can run code from the file",
            )
            p.add_argument(
                "--max-archive-gib",
                type=_positive_float,
                default=8.0,
                help="refuse .keras archives declaring more uncompressed data (default 8)",
            )
            p.add_argument(
                "--max-samples-gib",
                type=_positive_float,
                default=4.0,
                help="refuse .npy/.npz inputs declaring more data (default 4)",
            )
        if tolerances:
            p.add_argument(
                "--samples", help="inputs for verification: .npy, or .npz keyed by input name"
            )
            p.add_argument(
                "--input-shape",
                action="append",
                metavar="DIMS",
                help="shape of the synthetic inputs without the batch axis, e.g. 10100,4 (or "
                "name=10100,4; repeat per input); default: the samples', else one the model "
                "accepts",
            )
            p.add_argument(
                "--atol",
                type=float,
                default=None,
                help="default: by the model's compute dtype (float32 1e-6, float16 1e-3)",
            )
            p.add_argument(
                "--rtol",
                type=float,
                default=None,
                help="x max|output|, per output; default: float32 1e-5, float16 1e-2",
            )
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.add_argument(
            "--verbose", action="store_true", help="keep TensorFlow's C++ log lines on stderr"
        )

    p = sub.add_parser("inspect", help="BatchNorm layers, their conventions and the fold plan")
    common(p, tolerances=False)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("fold", help="fold BatchNorms and write a .keras file")
    common(p)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_fold)
    p = sub.add_parser(
        "export", help="fold, convert to ONNX (.onnx) or LiteRT (.tflite), verify, write"
    )
    common(p)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--no-fold", action="store_true")
    p.add_argument(
        "--opset", type=int, default=None, help="ONNX opset, 7 to 18 (default: tf2onnx's, 15)"
    )
    p.add_argument("--nchw", action="store_true", help="channels-first graph inputs")
    p.add_argument(
        "--precision",
        choices=["float32", "float16", "int8", "dynamic"],
        default="float32",
        help="float16 or int8 graphs are accepted by agreement with the float32 model; dynamic "
        "(int8 weights, float activations) is for .tflite",
    )
    p.add_argument("--int8-io", action="store_true", help=".tflite int8: int8 inputs and outputs")
    p.add_argument("--calibration", help="int8 calibration inputs: .npy, or .npz by input name")
    p.add_argument(
        "--calibrate-method", choices=["minmax", "entropy", "percentile"], default="minmax"
    )
    p.add_argument("--labels", help=".npy of class indices for --samples (else calibration)")
    p.add_argument(
        "--min-agreement", type=float, default=None, help="top-1; default float16 0.99, int8 0.98"
    )
    p.add_argument(
        "--min-cosine", type=float, default=None, help="default float16 0.999, int8 0.99"
    )
    p.add_argument(
        "--keep-float",
        action="append",
        default=[],
        metavar="LAYER",
        help="float16 or int8: leave this layer in float32 (repeat for several)",
    )
    p.add_argument(
        "--reduce-range",
        choices=["auto", "on", "off"],
        default="auto",
        help="int8: 7-bit weights (on), as onnxruntime advises for x86-64 CPUs without VNNI; "
        "auto: on where this CPU is one",
    )
    p.add_argument(
        "--benchmark",
        action="store_true",
        help="float16 or int8: also time both graphs in onnxruntime (batch 1 and 32, about a "
        "second each; a rough guide, benchmarks/bench_quantize.py is the benchmark)",
    )
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("verify", help="compare a .keras model with an .onnx file in onnxruntime")
    common(p)
    p.add_argument("onnx")
    p.add_argument(
        "--max-onnx-gib",
        type=_positive_float,
        default=8.0,
        help="memory onnxruntime may take running the file, and the largest tensor it may "
        "declare (default 8)",
    )
    p.add_argument(
        "--max-onnx-seconds",
        type=_positive_float,
        default=300.0,
        help="time onnxruntime may take for all runs (default 300)",
    )
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser(
        "doctor", help="why a BatchNorm model is bad at inference; exit 1 when it finds a problem"
    )
    common(p, tolerances=False)
    p.add_argument("--data", help="inputs like the inference data: .npy, or .npz by input name")
    p.add_argument(
        "--batch-size", type=_positive_int, default=32, help="use the training batch size"
    )
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser(
        "recalibrate", help="precise BatchNorm statistics from data, written to a new .keras file"
    )
    common(p, tolerances=False)
    p.add_argument("--data", required=True, help="inputs: .npy, or .npz keyed by input name")
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--batch-size", type=_positive_int, default=32, help="use the training batch size"
    )
    p.add_argument("--estimator", choices=["population", "batch_mean"], default="population")
    p.set_defaults(func=cmd_recalibrate)
    p = sub.add_parser("demo", help="train on bundled digits, fold, export, verify")
    p.add_argument("--out", default="keras-bn-demo")
    p.add_argument("--epochs", type=_positive_int, default=8)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _terminate(signum, frame):
    # No exception is raised into whatever TensorFlow is doing: the temporary file being written,
    # if any, is removed and the process ends. Outputs only ever appear by os.replace, so nothing
    # half-written is left at the destination.
    from .files import remove_pending

    remove_pending()
    _console.restore_stderr()
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    print(f"keras-bn: error: {word}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def main(argv=None):
    """The command line, callable in-process (a notebook, a test): installs no signal handler."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if _console.wants_quiet(argv):
        os.environ.setdefault(
            "TF_CPP_MIN_LOG_LEVEL", "3"
        )  # what TensorFlow's own logger still reads
    parser = build_parser()
    args = parser.parse_args(argv)
    from keras_bn.errors import KerasBNError, VerificationError, plain_text

    from .files import private_tempdir, run_inputs

    inputs = [
        getattr(args, name, None)
        for name in ("model", "samples", "data", "calibration", "labels", "onnx")
    ]
    try:
        # Keras's own temporaries (a .keras with assets is extracted whole while it loads) in
        # a folder that is removed even when the command is stopped.
        with run_inputs(inputs), private_tempdir():
            return args.func(args)
    except KerasBNError as error:
        if debug:
            traceback.print_exc()
        message = " ".join(plain_text(error).split())
        print(f"keras-bn: error: {message}", file=sys.stderr)
        return EXIT_VERIFY_FAILED if isinstance(error, VerificationError) else EXIT_BAD_INPUT
    except Exception as error:  # not the user's input: a bug of ours (or of a library under us)
        if debug:
            traceback.print_exc()
        text = " ".join(plain_text(error).split())[:500]
        print(
            f"keras-bn: internal error: {type(error).__name__}: {text}. This is a bug in "
            "keras-bn, not a problem with your input: please report it with the output of the "
            "same command run with --debug.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def console_main():
    """The `keras-bn` console script: `main` with SIGTERM and Ctrl-C ending the process cleanly
    (the temporary file being written removed, exit 143/130). Only here: in-process callers keep
    their own handlers, and a notebook kernel is never ended by `os._exit`."""
    if threading.current_thread() is threading.main_thread():  # signals are for the main thread
        signal.signal(signal.SIGTERM, _terminate)
        signal.signal(signal.SIGINT, _terminate)
    try:
        return main()
    finally:
        _console.restore_stderr()


if __name__ == "__main__":
    sys.exit(console_main())
