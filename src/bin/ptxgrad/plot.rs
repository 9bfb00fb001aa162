//! `ptxgrad train --plot FILE.svg`: the run's curves as the d2l book's `train_ch6` draws them,
//! one figure per run: over the epochs, train loss, train accuracy and test accuracy, with a
//! legend. SVG only: text is left to the viewer's fonts, so drawing needs no font files.

use std::fs;
use std::io::Write as _;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;

use ptxgrad::checkpoint::tmp_path;
use ptxgrad::train::EpochReport;

/// The figure's size in pixels (the book's 3.5 x 2.5 inches, scaled up to stay legible).
const SIZE: (u32, u32) = (640, 460);
/// Marker size in pixels: visible on every epoch, and the only mark a one-epoch run leaves.
const MARKER: u32 = 4;
/// At most this many epoch ticks: one per epoch up to ten, then every 2nd, 5th, 10th, ...
const MAX_TICKS: usize = 10;

/// The book's colours (matplotlib's default blue, 'm' and 'g'), each with its own marker so
/// the lines stay apart in grey.
const LOSS_COLOR: RGBColor = RGBColor(31, 119, 180);
const TRAIN_ACC_COLOR: RGBColor = RGBColor(191, 0, 191);
const TEST_ACC_COLOR: RGBColor = RGBColor(0, 128, 0);

/// One epoch's figures, as [`EpochReport`] has them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub epoch: usize,
    pub loss: f64,
    pub train_acc: f64,
    /// NaN where the run had no test examples.
    pub test_acc: f64,
}

impl From<&EpochReport> for Point {
    fn from(r: &EpochReport) -> Point {
        Point { epoch: r.epoch, loss: r.loss, train_acc: r.train_acc, test_acc: r.test_acc }
    }
}

/// Draws one series on `$chart`: its line through `$values` (broken at non-finite values), a
/// `$marker` (a plotters element made by `new(point, size, style)`) on each point, and its
/// legend entry, unless it has no finite value at all. A macro: each marker is its own type, and
/// plotters' boxed elements cannot borrow the SVG string they draw into.
macro_rules! plot_series {
    ($chart:expr, $label:expr, $color:expr, $values:expr, $marker:ident, $marker_style:expr) => {
        for (i, run) in finite_runs(&$values).into_iter().enumerate() {
            let (color, marker_style): (RGBColor, ShapeStyle) = ($color, $marker_style);
            let line = $chart.draw_series(LineSeries::new(run.iter().copied(), color.stroke_width(2)))?;
            if i == 0 {
                line.label($label).legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(-8, 0), (8, 0)], color.stroke_width(2))
                        + $marker::new((0, 0), MARKER, marker_style)
                });
            }
            $chart.draw_series(run.iter().map(|&p| $marker::new(p, MARKER, marker_style)))?;
        }
    };
}

/// Draws `epochs` (at least one, in order) as an SVG figure titled `title` and writes it to
/// `path`, atomically: a temp file beside `path` is renamed over it, so a crash leaves either
/// the old file or the whole new one (and at worst a stale `<path>.<pid>.tmp`). A series with no finite value (the test accuracy of a run
/// without test examples) is left out of the figure and its legend; a non-finite value in a
/// series (a diverged loss) breaks its line there.
pub fn write_svg(path: &Path, title: &str, epochs: &[Point]) -> Result<()> {
    if epochs.is_empty() {
        bail!("{}: no epochs to plot", path.display());
    }
    let svg = render(title, epochs).with_context(|| format!("{}: drawing the plot", path.display()))?;
    write_atomic(path, svg.as_bytes())
}

/// The figure as SVG text.
fn render(title: &str, epochs: &[Point]) -> Result<String> {
    // The axis starts at epoch 1 even for a resumed run, whose figure starts later.
    let first = epochs.iter().map(|p| p.epoch).min().unwrap_or(1).min(1);
    let last = epochs.iter().map(|p| p.epoch).max().unwrap_or(1).max(first);
    // Room either side of the first and last epochs, so their markers are not cut in half; a
    // single epoch gets a unit-wide axis with its point in the middle.
    let span = (last - first) as f64;
    let pad = if span == 0.0 { 0.5 } else { span * 0.04 };
    // Integer epochs only: a fractional epoch tick would mean nothing.
    let step = tick_step(last - first + 1);
    let ticks: Vec<f64> = (first..=last).filter(|e| e % step == 0).map(|e| e as f64).collect();
    // Accuracies live in [0, 1]; the loss starts near ln(10) = 2.3 and may be larger: the axis
    // covers both, rounded up to the next half (capped: near f64::MAX the rounding overflows).
    let top = epochs.iter().map(|p| p.loss).filter(|l| l.is_finite()).fold(1.0, f64::max);
    let top = ((top * 2.0).ceil() / 2.0).min(f64::MAX);

    let series =
        |value: fn(&Point) -> f64| -> Vec<(f64, f64)> { epochs.iter().map(|p| (p.epoch as f64, value(p))).collect() };
    let (loss, train_acc, test_acc) = (series(|p| p.loss), series(|p| p.train_acc), series(|p| p.test_acc));

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(44)
            .build_cartesian_2d(EpochAxis { range: (first as f64 - pad)..(last as f64 + pad), ticks }, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.1))
            .draw()?;
        plot_series!(chart, "train loss", LOSS_COLOR, loss, Circle, LOSS_COLOR.filled());
        plot_series!(chart, "train acc", TRAIN_ACC_COLOR, train_acc, TriangleMarker, TRAIN_ACC_COLOR.filled());
        plot_series!(chart, "test acc", TEST_ACC_COLOR, test_acc, Cross, TEST_ACC_COLOR.stroke_width(2));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 16))
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// The x axis: epochs as numbers (a point sits on its epoch), ticked at whole epochs only.
/// (plotters' own f64 axis places ticks at any round fraction, and binding key points to it
/// loses the label formatting that the mesh needs.)
struct EpochAxis {
    range: Range<f64>,
    ticks: Vec<f64>,
}

impl Ranged for EpochAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let fraction = (value - self.range.start) / (self.range.end - self.range.start);
        limit.0 + (f64::from(limit.1 - limit.0) * fraction).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Ticks and grid lines at the epochs; no finer lines between them.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

/// The runs of consecutive finite points of a series: its line breaks at NaN and infinity.
fn finite_runs(values: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    values.split(|(_, y)| !y.is_finite()).filter(|run| !run.is_empty()).map(<[(f64, f64)]>::to_vec).collect()
}

/// The step between epoch ticks: the smallest of 1, 2, 5, 10, 20, 50, ... that puts at most
/// [`MAX_TICKS`] ticks on `count` epochs.
fn tick_step(count: usize) -> usize {
    let mut scale = 1usize;
    loop {
        for m in [1, 2, 5] {
            let step = m * scale;
            if count.div_ceil(step) <= MAX_TICKS {
                return step;
            }
        }
        scale = scale.saturating_mul(10);
    }
}

/// Writes `contents` to this process's temp file beside `path`, fsyncs it, and renames it over
/// `path`. The directory must exist: a mistyped one is reported, not created.
fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    if path.is_dir() {
        bail!("{}: is a directory, not a file to write the plot to", path.display());
    }
    let tmp = tmp_path(path);
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp); // best effort: the error below is the one to report
        return Err(e).with_context(|| format!("{}: writing the plot (as {})", path.display(), tmp.display()));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: renaming {} over it", path.display(), tmp.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TITLE: &str = "LeNet on Fashion-MNIST, lr 0.9, batch 256";

    /// A fresh directory of this test's own under the system temp directory.
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ptxgrad-plot-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A run as the book's LeNet makes it: the loss falls from near ln(10), the accuracies rise.
    fn run(epochs: usize) -> Vec<Point> {
        (1..=epochs)
            .map(|e| {
                let t = e as f64;
                Point { epoch: e, loss: 2.3 / t.sqrt(), train_acc: 0.9 - 0.5 / t, test_acc: 0.88 - 0.5 / t }
            })
            .collect()
    }

    /// The figure at `path`, after checking that it is an SVG document.
    fn read_svg(path: &Path) -> String {
        let svg = fs::read_to_string(path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        svg
    }

    /// The contents of the <text> elements, in order.
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text").skip(1).filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim())).collect()
    }

    /// How many points each <polyline> stroked in `color` has, in document order.
    fn lines(svg: &str, color: RGBColor) -> Vec<usize> {
        let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
        svg.lines()
            .filter(|l| l.starts_with("<polyline") && l.contains(&stroke))
            .map(|l| {
                l.split("points=\"").nth(1).and_then(|p| p.split('"').next()).unwrap_or("").split_whitespace().count()
            })
            .collect()
    }

    /// Whatever `dir` holds: no temp file may be left beside a plot.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn ten_epochs_draw_three_lines_a_legend_and_the_title() {
        let dir = scratch("ten");
        let path = dir.join("curves.svg");
        write_svg(&path, TITLE, &run(10)).unwrap();
        let svg = read_svg(&path);
        let texts = texts(&svg);
        for want in [TITLE, "epoch", "train loss", "train acc", "test acc"] {
            assert_eq!(texts.iter().filter(|t| **t == want).count(), 1, "{want:?} in {texts:?}");
        }
        // One tick per epoch, whole numbers only.
        for e in 1..=10 {
            assert!(texts.contains(&e.to_string().as_str()), "tick {e} in {texts:?}");
        }
        assert!(!texts.contains(&"0") && !texts.contains(&"11"), "{texts:?}");
        // The loss starts at 2.3: the y axis goes up to 2.5.
        assert!(texts.contains(&"2.5") && !texts.contains(&"3.0"), "{texts:?}");
        // Each series: its 10-point line and its 2-point legend line.
        for color in [LOSS_COLOR, TRAIN_ACC_COLOR, TEST_ACC_COLOR] {
            assert_eq!(lines(&svg, color), [10, 2], "{color:?}");
        }
        // Markers: 10 on each line and one in each legend entry.
        assert_eq!(svg.matches("<circle").count(), 11);
        assert_eq!(svg.matches("<polygon").count(), 11);
        assert_eq!(listing(&dir), ["curves.svg"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_epoch_draws_its_points() {
        let dir = scratch("one");
        let path = dir.join("curves.svg");
        write_svg(&path, TITLE, &run(1)).unwrap();
        let svg = read_svg(&path);
        let texts = texts(&svg);
        for want in [TITLE, "epoch", "train loss", "train acc", "test acc", "1"] {
            assert!(texts.contains(&want), "{want:?} in {texts:?}");
        }
        assert!(!texts.contains(&"0") && !texts.contains(&"2"), "ticks at whole epochs only: {texts:?}");
        for color in [LOSS_COLOR, TRAIN_ACC_COLOR, TEST_ACC_COLOR] {
            assert_eq!(lines(&svg, color), [1, 2], "{color:?}");
        }
        // A point is seen by its marker: a circle, a triangle and a cross (two strokes) each.
        assert_eq!(svg.matches("<circle").count(), 2);
        assert_eq!(svg.matches("<polygon").count(), 2);
        assert_eq!(svg.matches("<line opacity=\"1\" stroke=\"#008000\"").count(), 4);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unmeasured_test_accuracy_is_left_out() {
        let dir = scratch("nan");
        let path = dir.join("curves.svg");
        let epochs: Vec<Point> =
            run(5).into_iter().map(|p| Point { test_acc: f64::NAN, loss: p.loss / 4.0, ..p }).collect();
        write_svg(&path, TITLE, &epochs).unwrap();
        let svg = read_svg(&path);
        let texts = texts(&svg);
        assert!(texts.contains(&"train loss") && texts.contains(&"train acc"), "{texts:?}");
        assert!(!texts.contains(&"test acc"), "{texts:?}");
        assert_eq!(lines(&svg, LOSS_COLOR), [5, 2]);
        assert_eq!(lines(&svg, TRAIN_ACC_COLOR), [5, 2]);
        assert!(!svg.contains("#008000"), "nothing drawn for the test accuracy");
        // Every value is below 1: the axis still shows the accuracies' whole range.
        assert!(texts.contains(&"1.0") && !texts.contains(&"1.5"), "{texts:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_diverged_loss_breaks_its_line() {
        let dir = scratch("diverged");
        let path = dir.join("curves.svg");
        let mut epochs = run(8);
        epochs[3].loss = f64::NAN;
        epochs[7].loss = f64::INFINITY;
        write_svg(&path, TITLE, &epochs).unwrap();
        let svg = read_svg(&path);
        // Epochs 1-3 and 5-7, then the legend's line; the infinite loss does not stretch the axis.
        assert_eq!(lines(&svg, LOSS_COLOR), [3, 3, 2]);
        assert_eq!(texts(&svg).iter().filter(|t| **t == "train loss").count(), 1);
        assert!(texts(&svg).contains(&"2.5"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error_that_names_the_path() {
        let dir = scratch("missing");
        let path = dir.join("no-such-dir").join("curves.svg");
        let err = format!("{:#}", write_svg(&path, TITLE, &run(3)).unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("No such file or directory"), "{err}");
        assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_is_not_overwritten() {
        let dir = scratch("isdir");
        let target = dir.join("curves.svg");
        fs::create_dir(&target).unwrap();
        let err = format!("{:#}", write_svg(&target, TITLE, &run(3)).unwrap_err());
        assert!(err.contains(&target.display().to_string()) && err.contains("is a directory"), "{err}");
        assert_eq!(listing(&dir), ["curves.svg"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_old_plot_is_replaced_whole() {
        let dir = scratch("replace");
        let path = dir.join("curves.svg");
        fs::write(&path, "x".repeat(100_000)).unwrap();
        write_svg(&path, TITLE, &run(2)).unwrap();
        let svg = read_svg(&path);
        assert!(!svg.contains("xxxx"));
        assert_eq!(listing(&dir), ["curves.svg"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_epochs_is_an_error() {
        let err = write_svg(Path::new("unused.svg"), TITLE, &[]).unwrap_err();
        assert!(err.to_string().contains("unused.svg: no epochs"), "{err}");
        assert!(!Path::new("unused.svg").exists());
    }

    #[test]
    fn epoch_ticks_are_whole_and_at_most_ten() {
        for (count, step) in [(1, 1), (10, 1), (11, 2), (20, 2), (21, 5), (50, 5), (51, 10), (90, 10), (101, 20)] {
            assert_eq!(tick_step(count), step, "{count} epochs");
        }
    }

    #[test]
    fn a_point_takes_an_epoch_reports_figures() {
        let r = EpochReport {
            epoch: 3,
            loss: 0.5,
            train_acc: 0.8,
            test_acc: f64::NAN,
            train_seconds: 1.0,
            examples: 10,
            epoch_seconds: 2.0,
        };
        let p = Point::from(&r);
        assert_eq!((p.epoch, p.loss, p.train_acc), (3, 0.5, 0.8));
        assert!(p.test_acc.is_nan());
    }
}
