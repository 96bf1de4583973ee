from dspost import doctor
from dspost.cli import main


def test_doctor_reports_every_check(capsys):
    main(["doctor"])
    out = capsys.readouterr().out
    for name, _ in doctor.CHECKS:
        assert f" {name}" in out
    assert "[ok] torch" in out and "[ok] python" in out


def test_failing_check_prints_its_fix(monkeypatch):
    monkeypatch.setattr(doctor, "CHECKS", [("disk", lambda: (False, "0.1 GiB free", "free disk space"))])
    lines = []
    assert doctor.run_doctor(lines.append) == 1
    assert lines[0].startswith("[FAIL] disk") and "fix: free disk space" in lines[0]
