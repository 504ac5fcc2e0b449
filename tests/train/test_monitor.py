"""The training bar shows evaluation progress inside training, without a second live display."""

from tuneforge.train.monitor import Monitor


def test_status_shows_eval_progress_in_the_training_bar(tmp_path):
    m = Monitor(tmp_path, total_steps=10, every=1, progress="bar")
    try:
        m.step(1, {"loss": 2.5, "tokens_per_s": 100.0})
        assert m._bar.tasks[0].fields["status"].startswith("loss 2.5000")
        m.status("evaluating 8/16 rows")
        assert m._bar.tasks[0].fields["status"] == "evaluating 8/16 rows"
        m.step(2, {"loss": 2.0, "tokens_per_s": 100.0})
        assert m._bar.tasks[0].fields["status"].startswith("loss 2.0000")
    finally:
        m.close()
    quiet = Monitor(tmp_path, total_steps=10, every=1, progress="plain")
    quiet.status("evaluating 1/2 rows")  # no bar: nothing to update, no error
    quiet.close()


def test_plain_eta_counts_from_the_first_step_not_the_eval_before_it(tmp_path, monkeypatch, capsys):
    import tuneforge.train.monitor as monitor_module

    clock = [0.0]
    monkeypatch.setattr(monitor_module.time, "perf_counter", lambda: clock[0])
    m = Monitor(tmp_path, total_steps=100, every=10, progress="plain")
    clock[0] = 600.0  # ten minutes of evaluation before training
    for step in range(1, 11):
        clock[0] += 2.0  # two seconds a step
        m.step(step, {"loss": 1.0})
    m.close()
    # 9 steps in 18 s after the first: 2 s a step, 90 steps left
    assert "step 10/100  loss 1.0000  0 tok/s  eta 180s" in capsys.readouterr().err


def test_a_full_disk_under_metrics_jsonl_is_counted_and_said_once_not_fatal(tmp_path, capsys):
    import errno

    m = Monitor(tmp_path, total_steps=10, every=1, progress="none")

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    m._file = FullDisk()
    m.step(1, {"loss": 2.5})
    m.write({"type": "eval", "step": 1, "eval_loss": 2.0})
    m.close()
    assert m.lost_records == 2
    err = capsys.readouterr().err
    assert err.count("could not be written ([Errno 28] No space left on device); training continues") == 1
