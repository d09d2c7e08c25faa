"""``training_replays``: attack traces that are, call for call, the start of a Training trace."""

from __future__ import annotations

from pathlib import Path

from bam.evaluation.adfa import training_replays
from bam.traces.adfa import load_adfa_dataset


def _write(root: Path, folder: str, name: str, calls: list[int]) -> None:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(" ".join(map(str, calls)) + " \n")


def test_replays_are_whole_prefixes_of_training_traces(tmp_path: Path) -> None:
    base = [5, 3, 3, 6, 192, 91, 4, 4, 4, 6, 1]
    _write(tmp_path, "Training_Data_Master", "UTD-0001.txt", base)
    _write(tmp_path, "Training_Data_Master", "UTD-0002.txt", [11, 45, 33, 5, 3, 6])
    _write(tmp_path, "Validation_Data_Master", "UVD-0001.txt", base)
    attack = tmp_path / "Attack_Data_Master"
    cases = {
        "Adduser_1/a.txt": base,  # the whole Training trace
        "Adduser_1/b.txt": base[:9],  # its start (the process was cut short)
        "Adduser_2/c.txt": [11, 45, 33],  # shorter than the 8-call index head
        "Web_Shell_1/d.txt": [*base, 11],  # continues past the end: new behaviour
        "Web_Shell_1/e.txt": [5, 3, 3, 6, 192, 91, 4, 4, 102, 6],  # differs inside
        "Web_Shell_2/f.txt": [45, 33, 5],  # inside a trace, not its start
    }
    for name, calls in cases.items():
        folder, file = name.split("/")
        _write(attack, folder, file, calls)
    data = load_adfa_dataset(tmp_path)
    flags = training_replays(data)
    got = {Path(t.name).name: bool(r) for t, r in zip(data.attack, flags, strict=True)}
    assert got == {
        "a.txt": True,
        "b.txt": True,
        "c.txt": True,
        "d.txt": False,
        "e.txt": False,
        "f.txt": False,
    }
