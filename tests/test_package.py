"""Package layout: what `import keras_bn` loads, and where keras_bn.export comes from."""

import json
import os
import re
import subprocess
import sys
import textwrap

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def test_import_keras_bn_does_not_load_the_export_stack():
    code = textwrap.dedent("""
        import json, sys
        import keras_bn
        before = {
            m: m in sys.modules for m in ("tf2onnx", "onnxruntime", "onnx", "keras_bn.export", "torch")
        }
        from keras_bn import export
        export.to_onnx  # the lazy attribute loads the converter
        after = {m: m in sys.modules for m in ("tf2onnx", "onnxruntime")}
        print(json.dumps({"before": before, "after": after, "file": export.__file__}))
    """)
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        cwd=os.path.dirname(__file__),
    )  # not the repository root
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["before"] == {
        "tf2onnx": False,
        "onnxruntime": False,
        "onnx": False,
        "keras_bn.export": False,
        "torch": False,  # keras_bn.interop reads state dicts without it
    }
    assert result["after"] == {"tf2onnx": True, "onnxruntime": True}
    # Installed from the top-level export/ folder of the design card.
    assert result["file"].endswith(os.path.join("export", "__init__.py"))


def test_keras_bn_never_imports_export():
    root = os.path.join(os.path.dirname(__file__), "..", "keras_bn")
    for name in os.listdir(root):
        if name.endswith(".py"):
            with open(os.path.join(root, name)) as handle:
                text = handle.read()
            imports = re.findall(
                r"^\s*(?:from|import)\s+(keras_bn\.export|export)\b|"
                r"^\s*from\s+keras_bn\s+import\s+.*\bexport\b",
                text,
                re.M,
            )
            assert not imports, name
