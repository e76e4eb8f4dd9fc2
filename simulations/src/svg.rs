//! A grouped bar chart as a standalone SVG document.
//!
//! The data model is a [`BarChart`]: groups along the x axis, one bar per series in each group,
//! and an optional error range per bar (drawn as a whisker, used for the paper's min–max
//! ranges). Text is escaped; the output depends only on the input, so regenerated plots diff
//! cleanly.

use std::fmt::Write as _;

/// One series: a name and one value per group (`None` leaves a gap).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
    /// Optional (low, high) range per group, drawn as a whisker over the bar.
    pub ranges: Vec<Option<(f64, f64)>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub groups: Vec<String>,
    pub series: Vec<Series>,
    /// Plot values on a log10 axis (for times spanning orders of magnitude).
    pub log_scale: bool,
}

const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f",
];

pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl BarChart {
    pub fn render(&self) -> String {
        let (width, height) = (960.0, 500.0);
        let (left, right, top, bottom) = (80.0, 220.0, 50.0, 110.0);
        let plot_w = width - left - right;
        let plot_h = height - top - bottom;
        let all: Vec<f64> = self
            .series
            .iter()
            .flat_map(|series| {
                series.values.iter().flatten().copied().chain(
                    series
                        .ranges
                        .iter()
                        .flatten()
                        .flat_map(|&(low, high)| [low, high]),
                )
            })
            .filter(|value| value.is_finite())
            .collect();
        let max = all.iter().copied().fold(0.0_f64, f64::max).max(1e-9);
        let min_positive = all
            .iter()
            .copied()
            .filter(|value| *value > 0.0)
            .fold(f64::INFINITY, f64::min);
        let (axis_low, axis_high) = if self.log_scale {
            let low = if min_positive.is_finite() {
                min_positive.log10().floor()
            } else {
                0.0
            };
            (low, max.log10().ceil().max(low + 1.0))
        } else {
            (0.0, nice_ceiling(max))
        };
        let scale = |value: f64| -> f64 {
            let position = if self.log_scale {
                (value.max(10f64.powf(axis_low)).log10() - axis_low) / (axis_high - axis_low)
            } else {
                value / axis_high
            };
            top + plot_h - position.clamp(0.0, 1.0) * plot_h
        };

        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
            left + plot_w / 2.0,
            escape(&self.title)
        );
        let _ = writeln!(
            out,
            r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + plot_h / 2.0,
            escape(&self.y_label)
        );
        // Grid lines and tick labels.
        let ticks: Vec<f64> = if self.log_scale {
            let (low, high) = (axis_low as i32, axis_high as i32);
            (low..=high).map(|power| 10f64.powi(power)).collect()
        } else {
            (0..=5)
                .map(|step| axis_high * f64::from(step) / 5.0)
                .collect()
        };
        for tick in ticks {
            let y = scale(tick);
            let _ = writeln!(
                out,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + plot_w,
                left - 6.0,
                y + 4.0,
                format_tick(tick)
            );
        }
        let groups = self.groups.len().max(1) as f64;
        let group_w = plot_w / groups;
        let bars = self.series.len().max(1) as f64;
        let bar_w = group_w * 0.8 / bars;
        // Long group names are slanted so neighbours do not overlap.
        let longest = self
            .groups
            .iter()
            .map(|g| g.chars().count())
            .max()
            .unwrap_or(0);
        let slanted = longest as f64 * 6.5 > group_w;
        for (group_index, group) in self.groups.iter().enumerate() {
            let group_x = left + group_w * group_index as f64;
            let (x, y) = (group_x + group_w / 2.0, top + plot_h + 18.0);
            let _ = if slanted {
                writeln!(
                    out,
                    r#"<text x="{x:.1}" y="{y:.1}" text-anchor="end" transform="rotate(-20 {x:.1} {y:.1})">{}</text>"#,
                    escape(group)
                )
            } else {
                writeln!(
                    out,
                    r#"<text x="{x:.1}" y="{y:.1}" text-anchor="middle">{}</text>"#,
                    escape(group)
                )
            };
            for (series_index, series) in self.series.iter().enumerate() {
                let x = group_x + group_w * 0.1 + bar_w * series_index as f64;
                let color = PALETTE[series_index % PALETTE.len()];
                if let Some(Some(value)) = series.values.get(group_index) {
                    let y = scale(*value);
                    let _ = writeln!(
                        out,
                        r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {}</title></rect>"#,
                        (bar_w - 1.0).max(1.0),
                        (top + plot_h - y).max(0.0),
                        escape(&series.name),
                        format_tick(*value)
                    );
                }
                if let Some(Some((low, high))) = series.ranges.get(group_index) {
                    let middle = x + bar_w / 2.0;
                    let _ = writeln!(
                        out,
                        r##"<line x1="{middle:.1}" y1="{:.1}" x2="{middle:.1}" y2="{:.1}" stroke="#222" stroke-width="2"/>"##,
                        scale(*low),
                        scale(*high)
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#222"/>"##,
            top + plot_h,
            left + plot_w,
            top + plot_h
        );
        for (index, series) in self.series.iter().enumerate() {
            let y = top + 10.0 + 20.0 * index as f64;
            let x = left + plot_w + 16.0;
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                y - 10.0,
                PALETTE[index % PALETTE.len()],
                x + 18.0,
                y,
                escape(&series.name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

fn nice_ceiling(value: f64) -> f64 {
    let power = 10f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if value <= step * power {
            return step * power;
        }
    }
    10.0 * power
}

fn format_tick(value: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_bar_per_value_and_escapes_text() {
        let chart = BarChart {
            title: "a < b".into(),
            y_label: "s".into(),
            groups: vec!["g1".into(), "g2".into()],
            series: vec![Series {
                name: "x & y".into(),
                values: vec![Some(1.0), None],
                ranges: vec![Some((0.5, 2.0)), None],
            }],
            log_scale: false,
        };
        let svg = chart.render();
        assert_eq!(
            svg.matches("<rect x=").count(),
            2,
            "one bar and one legend swatch"
        );
        assert!(svg.contains("a &lt; b") && svg.contains("x &amp; y"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
