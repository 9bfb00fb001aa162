//! How `ptxgrad train` shows a run as it goes: a progress bar over each epoch's steps (on
//! stderr, only on a terminal), then a line per epoch on stdout and in the `--json` file, and
//! the `--plot` figure redrawn with every epoch (so that a run stopped early still has its
//! picture).

use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

use ptxgrad::train::{EpochReport, Progress};

use crate::plot::{self, Point};
use crate::report::accuracy;

/// `--plot`: where the figure goes, its title, and the epochs drawn so far.
pub struct Plot {
    pub path: PathBuf,
    pub title: String,
    pub epochs: Vec<Point>,
}

/// The [`Progress`] of `ptxgrad train`.
pub struct Console<'a> {
    /// Draw a bar (false: `--quiet`).
    bar_shown: bool,
    /// The bar of the epoch running now.
    bar: Option<ProgressBar>,
    /// The `--json` file: one `"kind": "epoch"` line per epoch.
    json: Option<&'a mut File>,
    plot: Option<Plot>,
}

impl<'a> Console<'a> {
    pub fn new(bar_shown: bool, json: Option<&'a mut File>, plot: Option<Plot>) -> Console<'a> {
        Console { bar_shown, bar: None, json, plot }
    }
}

impl Progress for Console<'_> {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize) {
        if !self.bar_shown {
            return;
        }
        // Draws only on a terminal (indicatif hides itself when stderr is not one).
        let bar = ProgressBar::new(steps as u64);
        let style = ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("{epoch}/{epochs}"));
        self.bar = Some(bar);
    }

    fn steps(&mut self, done: usize, loss: f64, train_acc: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            bar.set_message(format!("loss {loss:.3}, train acc {train_acc:.3}"));
        }
    }

    fn steps_end(&mut self, completed: bool) {
        match self.bar.take() {
            // Cleared: the epoch's line replaces it.
            Some(bar) if completed => bar.finish_and_clear(),
            // Left where it stopped, above the error that says why.
            Some(bar) => bar.abandon(),
            None => {}
        }
    }

    fn epoch_end(&mut self, r: &EpochReport) -> ptxgrad::Result<()> {
        println!(
            "epoch {}: loss {:.3}, train acc {:.3}, test acc {}, {:.1} examples/sec ({:.1} end to end)",
            r.epoch,
            r.loss,
            r.train_acc,
            accuracy(r.test_acc),
            r.examples_per_sec(),
            r.end_to_end_examples_per_sec()
        );
        if let Some(f) = self.json.as_mut() {
            let line = serde_json::json!({
                "kind": "epoch", "epoch": r.epoch, "loss": r.loss, "train_acc": r.train_acc,
                "test_acc": r.test_acc, "examples_per_sec": r.examples_per_sec(),
                "end_to_end_examples_per_sec": r.end_to_end_examples_per_sec(),
            });
            writeln!(f, "{line}").map_err(|e| ptxgrad::Error::Io { path: "--json".into(), reason: e })?;
        }
        if let Some(p) = self.plot.as_mut() {
            p.epochs.push(Point::from(r));
            // A figure that cannot be written stops the run now, not at its end: the error
            // names the file and the reason, and the checkpoint is kept.
            plot::write_svg(&p.path, &p.title, &p.epochs)
                .map_err(|e| ptxgrad::Error::Invalid(format!("--plot: {e:#}")))?;
        }
        Ok(())
    }
}
