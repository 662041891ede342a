//! PNG plots of a run, drawn from its `metrics.jsonl`: loss and accuracy curves (training
//! minibatches and the test set) and the last test-set confusion matrix. Text uses a font
//! compiled into the binary, so plots look the same on machines without system fonts. And a
//! model's first-layer kernels as a picture (`filters_png`).

use crate::model::Model;
use crate::run_dir::METRICS_FILE;
use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;
use std::path::{Path, PathBuf};

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-ascii.ttf");
/// Every plot's width and height in pixels.
pub const SIZE: (u32, u32) = (900, 560);

/// The series a run's metrics hold, each point at (samples seen, value).
#[derive(Default)]
pub struct Curves {
    pub train_loss: Vec<(f64, f64)>,
    pub train_accuracy: Vec<(f64, f64)>,
    pub test_loss: Vec<(f64, f64)>,
    pub test_accuracy: Vec<(f64, f64)>,
    /// The last test evaluation's `confusion[true][predicted]`.
    pub confusion: Option<Vec<Vec<u64>>>,
}

pub fn read_curves(run_dir: &Path) -> Result<Curves> {
    let path = run_dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} a run directory?)", path.display(), run_dir.display()))?;
    let mut c = Curves::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let Some(x) = v["samples"].as_f64() else { continue };
        let add = |key: &str, series: &mut Vec<(f64, f64)>| {
            if let Some(y) = v[key].as_f64().filter(|y| y.is_finite()) {
                series.push((x, y));
            }
        };
        add("loss", &mut c.train_loss);
        add("accuracy", &mut c.train_accuracy);
        add("test_loss", &mut c.test_loss);
        add("test_accuracy", &mut c.test_accuracy);
        if let Ok(m) = serde_json::from_value::<Vec<Vec<u64>>>(v["confusion"].clone()) {
            c.confusion = Some(m);
        }
    }
    Ok(c)
}

pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).unwrap_or_else(|_| panic!("the bundled font is valid"))
    });
}

/// Render with `draw` onto an RGB canvas of `SIZE`, as PNG bytes.
fn render(draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>) -> Result<Vec<u8>> {
    register_font();
    let (w, h) = SIZE;
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw(&root)?;
        root.present().map_err(|e| anyhow!("drawing: {e}"))?;
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(image::codecs::png::PngEncoder::new(&mut png), &rgb, w, h, image::ExtendedColorType::Rgb8)
        .context("encoding a PNG")?;
    Ok(png)
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

/// One chart of training and test series against samples seen.
fn curves_chart(title: &str, y_desc: &str, train: &[(f64, f64)], test: &[(f64, f64)], log_y: bool) -> Result<Vec<u8>> {
    render(|root| {
        let all = || train.iter().chain(test);
        let x_max = all().map(|p| p.0).fold(1.0, f64::max);
        let (lo, hi) = all().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
        let (lo, hi) = if lo > hi { (0.0, 1.0) } else { (lo, hi) };
        let caption = (title, ("sans-serif", 24));
        let mut builder = ChartBuilder::on(root);
        builder.caption(caption.0, caption.1).margin(16).x_label_area_size(44).y_label_area_size(70);
        // Two drawing paths because a log axis is a different coordinate type.
        macro_rules! draw_on {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc("training samples")
                    .y_desc(y_desc)
                    .label_style(("sans-serif", 15))
                    .light_line_style(RGBColor(240, 240, 240))
                    .x_label_formatter(&|x| format!("{x:.0}"))
                    .y_label_formatter(&|y| format!("{}", (y * 1e4).round() / 1e4))
                    .draw()
                    .map_err(plot_err)?;
                chart
                    .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(1)))
                    .map_err(plot_err)?
                    .label("training minibatch")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], BLUE));
                chart
                    .draw_series(LineSeries::new(test.iter().copied(), RED.stroke_width(2)).point_size(4))
                    .map_err(plot_err)?
                    .label("test set")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], RED));
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .label_font(("sans-serif", 15))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(plot_err)?;
            }};
        }
        root.fill(&WHITE).map_err(plot_err)?;
        if log_y {
            let lo = lo.max(1e-4);
            draw_on!(builder.build_cartesian_2d(0.0..x_max, (lo * 0.8..hi.max(lo * 2.0) * 1.25).log_scale()).map_err(plot_err)?);
        } else {
            let pad = ((hi - lo) * 0.05).max(1e-3);
            draw_on!(builder.build_cartesian_2d(0.0..x_max, (lo - pad).max(0.0)..(hi + pad).min(1.0)).map_err(plot_err)?);
        }
        Ok(())
    })
}

/// The confusion matrix as a heat map (shade: share of the true class), counts in the cells,
/// and per-class accuracy beside each row.
fn confusion_chart(m: &[Vec<u64>]) -> Result<Vec<u8>> {
    render(|root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let k = m.len();
        let total: u64 = m.iter().flatten().sum();
        let correct: u64 = (0..k).map(|i| m[i][i]).sum();
        let title = format!("Test confusion matrix: {:.2}% of {total}", 100.0 * correct as f64 / total.max(1) as f64);
        let (w, h) = SIZE;
        let cell = ((h as i32 - 120) / k as i32).min((w as i32 - 260) / k as i32);
        let (x0, y0) = (90, 90);
        let text = |s: String, x: i32, y: i32, size: i32, color: &RGBColor| {
            let style = TextStyle::from(("sans-serif", size).into_font()).color(color).pos(Pos::new(HPos::Center, VPos::Center));
            root.draw(&Text::new(s, (x, y), style)).map_err(plot_err)
        };
        text(title, w as i32 / 2, 24, 22, &BLACK)?;
        text("predicted".into(), x0 + cell * k as i32 / 2, y0 - 34, 16, &BLACK)?;
        text("true".into(), 30, y0 + cell * k as i32 / 2, 16, &BLACK)?;
        text("accuracy".into(), x0 + cell * k as i32 + 70, y0 - 12, 15, &BLACK)?;
        for (i, row) in m.iter().enumerate() {
            let row_total = row.iter().sum::<u64>().max(1) as f64;
            let y = y0 + cell * i as i32;
            text(i.to_string(), x0 - 16, y + cell / 2, 15, &BLACK)?;
            text(format!("{:.2}%", 100.0 * row[i] as f64 / row_total), x0 + cell * k as i32 + 70, y + cell / 2, 15, &BLACK)?;
            for (j, &count) in row.iter().enumerate() {
                let x = x0 + cell * j as i32;
                if i == 0 {
                    text(j.to_string(), x + cell / 2, y0 - 12, 15, &BLACK)?;
                }
                let share = count as f64 / row_total;
                // Light for rare, dark blue for the bulk; off-diagonal errors stay readable.
                let shade = |full: f64| (255.0 - (255.0 - full) * share.sqrt()) as u8;
                let fill = RGBColor(shade(30.0), shade(80.0), shade(160.0));
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], fill.filled())).map_err(plot_err)?;
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], RGBColor(200, 200, 200))).map_err(plot_err)?;
                if count > 0 {
                    let ink = if share > 0.35 { WHITE } else { BLACK };
                    text(count.to_string(), x + cell / 2, y + cell / 2, 13, &ink)?;
                }
            }
        }
        Ok(())
    })
}

/// The first convolution's kernels as a grid of tiles, each kernel scaled to its own range
/// (the paper's figure 3): colour for RGB inputs (AlexNet's 96 of 11x11x3), grey for one
/// channel (the seed model's 64 of 3x3). PNG bytes and (width, height).
pub fn filters_png(model: &Model) -> Result<(Vec<u8>, (u32, u32))> {
    let (conv, param) = model
        .layers
        .iter()
        .find_map(|l| l.conv().map(|conv| (conv, l.params.start)))
        .with_context(|| format!("model {} has no convolution", model.arch.name))?;
    let (k, cin, out) = (conv.win.kernel, conv.in_c / conv.groups, conv.out_c);
    if cin != 1 && cin != 3 {
        anyhow::bail!("the first convolution of {} sees {cin} channels: only 1 (grey) or 3 (colour) make a picture", model.arch.name);
    }
    let w = &model.params[param].value;
    tile_grid(out, [k, k], cin == 3, |o, y, x, c| w[((y * k + x) * cin + c) * out + o])
}

/// Layer `layer`'s feature maps for one input, `output` (its HWC activations): a grey tile
/// per channel, each scaled to its own range.
pub fn activations_png(model: &Model, layer: usize, output: &[f32]) -> Result<(Vec<u8>, (u32, u32))> {
    let [h, w, c] = model.shapes[layer + 1];
    tile_grid(c, [h, w], false, |ch, y, x, _| output[(y * w + x) * c + ch])
}

/// `count` tiles of `[h, w]` pixels (`colour`: 3 channels, else grey), pixel values `at(tile,
/// y, x, channel)`, each tile scaled to its own range, ~48 pixels high, 4 apart, in a
/// near-square grid: PNG bytes and (width, height).
fn tile_grid(
    count: usize,
    [h, w]: [usize; 2],
    colour: bool,
    at: impl Fn(usize, usize, usize, usize) -> f32,
) -> Result<(Vec<u8>, (u32, u32))> {
    let channels = if colour { 3 } else { 1 };
    let scale = (48 / h.max(w)).max(1) as u32;
    let (tile_w, tile_h, gap) = (w as u32 * scale, h as u32 * scale, 4u32);
    let cols = (count as f64).sqrt().ceil() as u32;
    let rows = (count as u32).div_ceil(cols);
    let (width, height) = (cols * (tile_w + gap) + gap, rows * (tile_h + gap) + gap);
    let mut img = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    for t in 0..count {
        let values = (0..h * w * channels).map(|i| at(t, i / (w * channels), (i / channels) % w, i % channels));
        let (lo, hi) = values.fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let span = (hi - lo).max(f32::MIN_POSITIVE);
        let (x0, y0) = (gap + (t as u32 % cols) * (tile_w + gap), gap + (t as u32 / cols) * (tile_h + gap));
        for (py, px) in (0..tile_h).flat_map(|y| (0..tile_w).map(move |x| (y, x))) {
            let (y, x) = ((py / scale) as usize, (px / scale) as usize);
            let level = |c: usize| (255.0 * (at(t, y, x, c) - lo) / span).round() as u8;
            let rgb = if colour { [level(0), level(1), level(2)] } else { [level(0); 3] };
            img.put_pixel(x0 + px, y0 + py, image::Rgb(rgb));
        }
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        img.as_raw(),
        width,
        height,
        image::ExtendedColorType::Rgb8,
    )
    .context("encoding a PNG")?;
    Ok((png, (width, height)))
}

/// A run's plots as PNG images of `SIZE`, by name: `loss`, `accuracy` and (once the test set
/// was evaluated) `confusion`.
pub fn run_plots(run_dir: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let c = read_curves(run_dir)?;
    if c.train_loss.is_empty() && c.test_loss.is_empty() {
        anyhow::bail!("{}: no metrics to plot yet", run_dir.join(METRICS_FILE).display());
    }
    let mut plots = vec![
        ("loss", curves_chart("Loss", "cross-entropy (log scale)", &c.train_loss, &c.test_loss, true)?),
        ("accuracy", curves_chart("Accuracy", "accuracy", &c.train_accuracy, &c.test_accuracy, false)?),
    ];
    if let Some(m) = &c.confusion {
        plots.push(("confusion", confusion_chart(m)?));
    }
    Ok(plots)
}

/// Write `loss.png`, `accuracy.png` and (once the test set was evaluated) `confusion.png` into
/// the run directory; returns the paths written.
pub fn write_run_plots(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (name, png) in run_plots(run_dir)? {
        let path = run_dir.join(format!("{name}.png"));
        crate::files::write_atomic(&path, &png)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_a_run_from_its_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        for step in 1..=20u64 {
            let loss = 2.3 / step as f64;
            lines.push(serde_json::json!({"step": step, "samples": step * 64, "loss": loss, "accuracy": 1.0 - loss / 3.0}).to_string());
        }
        let confusion: Vec<Vec<u64>> = (0..10).map(|i| (0..10).map(|j| if i == j { 95 } else { (i + j) as u64 % 3 }).collect()).collect();
        lines.push(
            serde_json::json!({"step": 20, "samples": 1280, "test_loss": 0.2, "test_accuracy": 0.93, "confusion": confusion}).to_string(),
        );
        std::fs::write(dir.path().join(METRICS_FILE), lines.join("\n")).unwrap();
        let written = write_run_plots(dir.path()).unwrap();
        assert_eq!(written.len(), 3);
        for p in &written {
            let img = image::open(p).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), SIZE);
            // Something was drawn: not a blank canvas, and some pixels are dark (text, lines).
            assert!(img.pixels().filter(|p| p.0.iter().all(|&c| c < 100)).count() > 200, "{} looks empty", p.display());
        }
        let c = read_curves(dir.path()).unwrap();
        assert_eq!((c.train_loss.len(), c.test_accuracy.len()), (20, 1));
        assert_eq!(c.confusion.unwrap()[3][3], 95);
        let err = format!("{:#}", write_run_plots(&dir.path().join("nope")).unwrap_err());
        assert!(err.contains("metrics.jsonl") && err.contains("nope"), "{err}");
    }

    /// Each kernel in its tile, scaled to its own range: a colour kernel whose red top-left
    /// weight is its largest and blue its smallest shows pure-ish red there; tiles sit in a
    /// near-square grid.
    #[test]
    fn filters_are_tiles_of_kernels_each_scaled_to_its_range() {
        use crate::layers::Padding;
        use crate::layers::convolution::ConvSpec;
        use crate::layers::linear::LinearSpec;
        use crate::model::{Architecture, Init, LayerSpec};
        let conv = LayerSpec::Conv(ConvSpec {
            name: "conv1".into(),
            out_c: 5,
            kernel: 4,
            stride: 1,
            padding: Padding::Valid,
            groups: 1,
            relu: true,
        });
        let fc = LayerSpec::Linear(LinearSpec { name: "fc".into(), out: 2, relu: false });
        let arch = Architecture { name: "tiny".into(), input: [6, 6, 3], layers: vec![conv, fc], init: Init::He, input_scale: 1.0 };
        let mut m = Model::new(&arch).unwrap();
        m.init(1, 0.0);
        let w = &mut m.params[0].value;
        // HWIO: kernel 0, pixel (0, 0): red +9, blue -9 (beyond every other weight).
        (w[0], w[2 * 5]) = (9.0, -9.0);
        let (png, (width, height)) = filters_png(&m).unwrap();
        // 5 kernels of 4x4 at 12x: 3 columns, 2 rows of 48-pixel tiles, 4 pixels apart.
        assert_eq!((width, height), (3 * 52 + 4, 2 * 52 + 4));
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (width, height));
        let p = img.get_pixel(4 + 5, 4 + 5).0;
        assert!(p[0] == 255 && p[2] == 0, "red max, blue min: {p:?}");
        assert_eq!(img.get_pixel(2, 2).0, [255, 255, 255], "the gaps are white");
        let grey = Model::new(&crate::architectures::alexnet_mnist()).unwrap();
        assert_eq!(filters_png(&grey).unwrap().1, (8 * 52 + 4, 8 * 52 + 4), "64 grey 3x3 kernels at 16x");
    }
}
