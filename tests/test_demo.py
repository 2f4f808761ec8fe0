"""`lines-fast demo`, the README's first command, runs and checks itself against the reference."""
from lines_fast.cli import main


def test_demo_runs_and_matches_the_reference(tmp_path, capsys):
    assert main(["demo", "--keep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ties, density 0.2" in out and "LiNeS alpha" in out
    assert "within the tolerances of docs/methods.md: OK" in out
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_demo_keep_on_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["demo", "--keep", str(target)]) == 2
    assert "that is a file" in capsys.readouterr().err and target.read_text() == "mine"
