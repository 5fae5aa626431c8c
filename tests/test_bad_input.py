"""Bad input to the four CLIs ends in one line on stderr and exit status 2, never a traceback."""
import json

import pytest
import torch

import eval as ev
import model
import taps
import train

CLIS = {
    "model.py": (model.main, ["--prompt", "hi"]),
    "taps.py": (taps.main, ["--prompt", "hi", "--drafter", "random"]),
    "train.py": (train.main, ["--domain", "math"]),
    "eval.py": (ev.main, ["--limit", "1", "--bench", "gsm8k"]),
}


def one_line_error(capsys, fn, argv) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize("device, message", [
    pytest.param("cuda", "this torch build has no CUDA support or no GPU is visible; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    ("nonsense", "not a device; use cpu, cuda or cuda:N"),
    ("meta", "taps runs on cpu and cuda only")])
def test_unusable_device(capsys, cli, device, message):
    fn, argv = CLIS[cli]
    assert message in one_line_error(capsys, fn, argv + ["--device", device])


def test_negative_max_new_tokens(capsys):
    assert "max_new_tokens must be >= 0, got -5" in one_line_error(capsys, model.main, ["--prompt", "hi", "--max-new-tokens", "-5"])


def test_report_on_a_directory_or_an_incomplete_result(tmp_path, capsys):
    assert "is a directory" in one_line_error(capsys, ev.main, ["--report", str(tmp_path)])
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"config": {"method": "merged", "temperature": 0}, "results": {}}))
    assert "not an eval.py result" in one_line_error(capsys, ev.main, ["--report", str(bad)])
