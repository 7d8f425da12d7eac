"""Every bad input gets one clear sentence on stderr, exit code 2, and no traceback."""

from __future__ import annotations

import subprocess
import sys


from conftest import ROOT, one_sentence as _one_sentence, tiny_overrides

QS = ROOT / "configs" / "quickstart.yaml"


def test_missing_config_file(run_cli, tmp_path):
    code, _, err = run_cli("train", tmp_path / "nope.yaml")
    _one_sentence(code, err, "nope.yaml", "does not exist")


def test_yaml_syntax_error(run_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 1\n  batch_size: [32\n")
    code, _, err = run_cli("train", bad)
    _one_sentence(code, err, "not valid YAML", "line 4")


def test_unknown_key(run_cli):
    code, _, err = run_cli("train", QS, "train.batchsize=8")
    _one_sentence(code, err, "unknown config key train.batchsize", "did you mean train.batch_size")


def test_wrong_type(run_cli):
    code, _, err = run_cli("train", QS, "train.epochs=many")
    _one_sentence(code, err, "train.epochs", "'many'", "number")


def test_out_of_range_value(run_cli):
    code, _, err = run_cli("train", QS, "train.batch_size=0")
    _one_sentence(code, err, "train.batch_size", "0", "greater than 0")


def test_missing_text_column(run_cli, tiny_bert, tmp_path):
    code, _, err = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "r", **{"data.text_column": "review"}))
    _one_sentence(code, err, "no column 'review'", "text, label", "data.text_column")


def test_missing_label_column(run_cli, tiny_bert, tmp_path):
    code, _, err = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "r", **{"data.label_column": "stars"}))
    _one_sentence(code, err, "no column 'stars'", "data.label_column")


def test_label_outside_label_set(run_cli, tiny_bert, tmp_path):
    code, _, err = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "r", **{"data.labels": "[fresh, stale]"}))
    _one_sentence(code, err, "'rotten' is not in the label set", "data.labels")


def test_label_in_validation_file_outside_train_labels(run_cli, tiny_bert, tmp_path):
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("text,label\n" + "".join(f"good {i},pos\nbad {i},neg\n" for i in range(20)))
    val.write_text("text,label\nfine,pos\nmeh,neutral\n")
    over = tiny_overrides(tiny_bert, tmp_path / "r", **{"data.train_file": train, "data.validation_file": val})
    code, _, err = run_cli("train", QS, *over)
    _one_sentence(code, err, "validation label 'neutral'", "['neg', 'pos']")


def test_empty_data_file(run_cli, tiny_bert, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    code, _, err = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "r", **{"data.train_file": empty}))
    _one_sentence(code, err, "empty.csv has no records")


def test_non_string_text(run_cli, tiny_bert, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "label": "a"}\n{"text": 42, "label": "b"}\n')
    code, _, err = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "r", **{"data.train_file": f}))
    _one_sentence(code, err, "d.jsonl line 2", "42 (int), not text")


def test_folder_without_label_subfolders(run_cli, tiny_bert, tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a loose text file, no label")
    code, _, err = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "r", **{"data.train_file": tmp_path / "texts"}))
    _one_sentence(code, err, "holds no subfolders of .txt files", "one subfolder per label")


def test_ragged_csv_row(run_cli, tiny_bert, tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("text,label\ngood,pos\nbad, very bad,neg\n")
    code, _, err = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "r", **{"data.train_file": f}))
    _one_sentence(code, err, "r.csv line 3 has 3 fields where the header has 2", "quote fields")


def test_missing_data_file(run_cli, tiny_bert, tmp_path):
    code, _, err = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "r", **{"data.train_file": tmp_path / "x.csv"}))
    _one_sentence(code, err, "x.csv does not exist", "rotten-tomatoes")


def test_missing_model_path(run_cli, tmp_path):
    code, _, err = run_cli("train", QS, f"model.name_or_path={tmp_path}/no/such/model", f"output.dir={tmp_path}/r")
    _one_sentence(code, err, "model path", "does not exist", "minilm-l6")


def test_hub_model_name_while_offline(run_cli, tmp_path):
    code, _, err = run_cli("train", QS, "model.name_or_path=bert-base-uncased", f"output.dir={tmp_path}/r")
    _one_sentence(code, err, "'bert-base-uncased'", "offline", "packaged model (minilm-l6, smollm2-135m)")


def test_fp16_on_cpu(run_cli, tmp_path):
    code, _, err = run_cli("train", QS, "train.mixed_precision=fp16", f"output.dir={tmp_path}/r")
    _one_sentence(code, err, "fp16 needs a CUDA GPU", "bf16")


def test_unknown_best_metric(run_cli, tmp_path):
    code, _, err = run_cli("train", QS, "train.metric_for_best=eval/bleu", f"output.dir={tmp_path}/r")
    _one_sentence(code, err, "eval/bleu", "eval/accuracy")


def test_non_empty_run_folder_is_not_clobbered(run_cli, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("precious")
    code, _, err = run_cli("train", QS, f"output.dir={tmp_path}/r")
    _one_sentence(code, err, "is not empty", "output.overwrite=true")
    assert (tmp_path / "r" / "keep.txt").read_text() == "precious"


def test_predict_on_a_folder_without_a_model(run_cli, tmp_path):
    code, _, err = run_cli("predict", tmp_path, "hello")
    _one_sentence(code, err, "holds no trained model")


def test_real_process_prints_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "shardtune.cli", "train", str(QS), "optim.lr=fast"],
        capture_output=True, text=True, timeout=120,
    )
    _one_sentence(proc.returncode, proc.stderr, "optim.lr", "'fast'")
