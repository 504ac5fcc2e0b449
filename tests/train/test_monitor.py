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
