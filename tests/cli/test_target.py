"""``qpasses quantize --target``: torch.ao engines save the int8 model, runtimes write their artifact."""

import json
import sys

import pytest
import torch
import torch.fx as fx

import qpasses
from qpasses.lower import TARGETS, Target
from qpasses.lower.inductor import FUSION_PASSES, missing_runtime
from tests.cli.test_cli import SMALL, TINY, assert_one_line_error, run


def test_torch_ao_target_saves_the_int8_model_like_backend(tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    code, stdout, _ = run(capsys, "quantize", TINY, *SMALL, "--target", "qnnpack", "--out", str(out), "--json")
    assert code == 0
    assert json.loads(stdout)["backend"] == "qnnpack" and json.loads(stdout)["target"] == "qnnpack"
    model = qpasses.load(out)
    assert isinstance(model, fx.GraphModule)
    assert any(node.target is torch.quantize_per_tensor for node in model.graph.nodes)  # torch.ao's int8 model


@pytest.mark.skipif(missing_runtime() is not None, reason=str(missing_runtime()))
def test_inductor_target_writes_an_aotinductor_package_running_int8_kernels(tmp_path, capsys):
    out = tmp_path / "tiny.pt2"
    code, stdout, _ = run(capsys, "quantize", TINY, *SMALL, "--target", "inductor", "--out", str(out), "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert (summary["backend"], summary["target"], summary["artifact"]) == ("inductor", "inductor", str(out))
    assert summary["int8_kernels"] == {"onednn.qconv_pointwise": 5}  # the tiny U-Net's five convs
    package = torch._inductor.aoti_load_package(str(out))
    assert package(torch.randn(1, 3, 16, 16)).shape == (1, 1, 16, 16)


def test_backend_conflicting_with_the_target_is_one_line(capsys):
    code, _, err = run(capsys, "quantize", TINY, *SMALL, "--target", "inductor", "--backend", "qnnpack")
    assert_one_line_error(code, err, "--backend qnnpack conflicts with --target inductor", "'inductor' preset")


def test_runtime_target_needs_ptq_and_its_file_suffix(capsys):
    code, _, err = run(capsys, "quantize", TINY, *SMALL, "--target", "inductor", "--passes", "fusebn")
    assert_one_line_error(code, err, "add ptq to --passes")
    code, _, err = run(capsys, "quantize", TINY, *SMALL, "--target", "inductor", "--out", "model.pt")
    assert_one_line_error(code, err, "--target inductor writes a .pt2 file; name it model.pt2")


def test_missing_runtime_names_the_pip_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, FUSION_PASSES, None)  # as if torchao were not installed
    code, _, err = run(capsys, "quantize", TINY, *SMALL, "--target", "inductor", "--out", "x.pt2")
    assert_one_line_error(code, err, "--target inductor", "pip install 'qpasses[inductor]'")
    # a target registered later (e.g. by another runtime's module) needs no CLI edit, and its missing module too
    monkeypatch.setitem(TARGETS, "someruntime", Target("someruntime", "qpasses_no_such_runtime", "x86", "someextra"))
    code, _, err = run(capsys, "quantize", TINY, *SMALL, "--target", "someruntime")
    assert_one_line_error(code, err, "no module 'qpasses_no_such_runtime'", "pip install 'qpasses[someextra]'")
