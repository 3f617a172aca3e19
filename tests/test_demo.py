from skmml import demo


def test_demo_runs_end_to_end_and_reports_each_step(capsys):
    demo.main()
    out = capsys.readouterr().out
    for step in ("1. Accuracy", "2. A prediction explained", "3. A new class",
                 "4. Forgetting items", "5. Pruning"):
        assert step in out
    assert "identical to a classifier built from scratch without them: True" in out
    assert "memory without 9s: accuracy on test 9s = 0.000" in out
