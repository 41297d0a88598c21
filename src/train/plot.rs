//! loss.png: the training (and eval) loss curve, drawn into a pixel buffer and saved as PNG.
//! Deliberately tiny: lines, dots, axes and a 5×7 bitmap font for the labels.

use super::metrics::Metric;
use crate::io::atomic_write;
use anyhow::Result;
use std::path::Path;

const W: usize = 720;
const H: usize = 420;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 30;
const BOTTOM: usize = 45;

type Rgb = [u8; 3];
const TRAIN: Rgb = [31, 119, 180];
const EVAL: Rgb = [255, 127, 14];
const AXIS: Rgb = [60, 60, 60];
const GRID: Rgb = [225, 225, 225];

/// 5×7 glyphs, one byte per row, low 5 bits used (bit 4 = leftmost pixel).
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'i' => [4, 0, 12, 4, 4, 4, 14],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 15, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'v' => [0, 0, 17, 17, 17, 10, 4],
        _ => [0; 7],
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas { px: vec![255; W * H * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = ((x0 + t * (x1 - x0)).round() as i64, (y0 + t * (y1 - y0)).round() as i64);
            self.set(x, y, c);
            self.set(x, y + 1, c);
        }
    }

    fn dot(&mut self, (x, y): (f64, f64), c: Rgb) {
        for dy in -2..=2 {
            for dx in -2..=2 {
                self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
            }
        }
    }

    fn text(&mut self, x: usize, y: usize, s: &str, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (16 >> col) != 0 {
                        self.set((x + k * 6 + col) as i64, (y + row) as i64, c);
                    }
                }
            }
        }
    }
}

fn label(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws train loss (line) and eval loss (dots joined by a line) against the step.
pub fn loss_png(metrics: &[Metric], path: &Path) -> Result<()> {
    let train: Vec<(f64, f64)> = metrics.iter().filter_map(|m| m.loss.map(|l| (m.step as f64, l))).collect();
    let eval: Vec<(f64, f64)> = metrics.iter().filter_map(|m| m.eval_loss.map(|l| (m.step as f64, l))).collect();
    let all: Vec<&(f64, f64)> = train.iter().chain(&eval).filter(|p| p.1.is_finite()).collect();
    let mut c = Canvas::new();
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let (mut ymin, mut ymax) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if all.is_empty() {
        (ymin, ymax) = (0.0, 1.0);
    }
    if ymax - ymin < 1e-6 {
        ymax += 0.5;
        ymin -= 0.5;
    }
    let pad = 0.05 * (ymax - ymin);
    let (ymin, ymax) = (ymin - pad, ymax + pad);
    let to_px = |(x, y): (f64, f64)| (LEFT as f64 + x / xmax * pw, TOP as f64 + (ymax - y) / (ymax - ymin) * ph);
    for i in 0..=4 {
        let y = ymin + (ymax - ymin) * i as f64 / 4.0;
        let py = to_px((0.0, y)).1;
        c.line((LEFT as f64, py), ((W - RIGHT) as f64, py), GRID);
        c.text(8, py as usize - 3, &label(y), AXIS);
        let x = xmax * i as f64 / 4.0;
        let px = to_px((x, 0.0)).0;
        c.text(px as usize - 6, H - BOTTOM + 8, &format!("{x:.0}"), AXIS);
    }
    c.line((LEFT as f64, TOP as f64), (LEFT as f64, (H - BOTTOM) as f64), AXIS);
    c.line((LEFT as f64, (H - BOTTOM) as f64), ((W - RIGHT) as f64, (H - BOTTOM) as f64), AXIS);
    c.text(W / 2 - 12, H - 16, "step", AXIS);
    c.text(8, 10, "loss", AXIS);
    for w in train.windows(2) {
        c.line(to_px(w[0]), to_px(w[1]), TRAIN);
    }
    if train.len() == 1 {
        c.dot(to_px(train[0]), TRAIN);
    }
    for w in eval.windows(2) {
        c.line(to_px(w[0]), to_px(w[1]), EVAL);
    }
    for &p in &eval {
        c.dot(to_px(p), EVAL);
    }
    c.line(((W - 150) as f64, 14.0), ((W - 130) as f64, 14.0), TRAIN);
    c.text(W - 125, 11, "train", AXIS);
    c.dot(((W - 70) as f64, 14.0), EVAL);
    c.text(W - 60, 11, "eval", AXIS);

    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(&c.px)?;
    }
    atomic_write(path, &out)
}
