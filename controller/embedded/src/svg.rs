//! A grouped bar chart as a standalone SVG document, for the demo report.
//!
//! Data model: a [`BarChart`] has groups along the x axis and one bar per series in each group
//! (`None` leaves a gap); values are drawn on a linear axis from zero with the value printed
//! above each bar. The output depends only on the input, so a regenerated plot diffs cleanly.

use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub groups: Vec<String>,
    pub series: Vec<Series>,
}

const PALETTE: [&str; 6] = [
    "#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#76b7b2", "#b07aa1",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum (1, 2, 2.5 or 5 times a power of ten) at or above `value`.
fn nice_max(value: f64) -> f64 {
    if !(value.is_finite() && value > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|step| step * magnitude)
        .find(|candidate| *candidate >= value)
        .unwrap_or(10.0 * magnitude)
}

impl BarChart {
    pub fn to_svg(&self) -> String {
        let (width, height) = (760.0, 420.0);
        let (left, right, top, bottom) = (70.0, 20.0, 50.0, 90.0);
        let plot_width = width - left - right;
        let plot_height = height - top - bottom;
        let highest = self
            .series
            .iter()
            .flat_map(|series| series.values.iter().flatten())
            .fold(0.0f64, |max, value| max.max(*value));
        let axis_max = nice_max(highest);
        let y = |value: f64| top + plot_height * (1.0 - value / axis_max);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect width="{width}" height="{height}" fill="white"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            width / 2.0,
            escape(&self.title)
        );
        for tick in 0..=5 {
            let value = axis_max * f64::from(tick) / 5.0;
            let at = y(value);
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{at:.1}" x2="{}" y2="{at:.1}" stroke="#dddddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + plot_width,
                left - 6.0,
                at + 4.0,
                format_value(value)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + plot_height / 2.0,
            escape(&self.y_label)
        );
        let groups = self.groups.len().max(1) as f64;
        let group_width = plot_width / groups;
        let series_count = self.series.len().max(1) as f64;
        let bar_width = group_width * 0.8 / series_count;
        for (group_index, group) in self.groups.iter().enumerate() {
            let group_left = left + group_width * group_index as f64;
            for (series_index, series) in self.series.iter().enumerate() {
                let Some(Some(value)) = series.values.get(group_index) else {
                    continue;
                };
                let x = group_left + group_width * 0.1 + bar_width * series_index as f64;
                let color = PALETTE[series_index % PALETTE.len()];
                let bar_top = y(*value);
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x:.1}" y="{bar_top:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {}</title></rect>"#,
                    bar_width * 0.95,
                    (top + plot_height - bar_top).max(0.0),
                    escape(&series.name),
                    format_value(*value)
                );
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                    x + bar_width * 0.475,
                    bar_top - 3.0,
                    format_value(*value)
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                group_left + group_width / 2.0,
                top + plot_height + 18.0,
                escape(group)
            );
        }
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#333333"/>"##,
            top + plot_height,
            left + plot_width,
            top + plot_height
        );
        for (index, series) in self.series.iter().enumerate() {
            let x = left + 160.0 * index as f64;
            let legend_y = height - 30.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{legend_y:.1}">{}</text>"#,
                legend_y - 10.0,
                PALETTE[index % PALETTE.len()],
                x + 16.0,
                escape(&series.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn format_value(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(7.3), 10.0);
        assert_eq!(nice_max(23.0), 25.0);
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(150.0), 200.0);
    }

    #[test]
    fn chart_has_a_bar_per_value_and_escapes_text() {
        let chart = BarChart {
            title: "MTT & NTT".into(),
            y_label: "seconds".into(),
            groups: vec!["25 %".into(), "50 %".into()],
            series: vec![
                Series {
                    name: "MTT".into(),
                    values: vec![Some(10.0), Some(12.0)],
                },
                Series {
                    name: "NTT".into(),
                    values: vec![Some(14.0), None],
                },
            ],
        };
        let svg = chart.to_svg();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("MTT &amp; NTT"));
        assert_eq!(svg.matches("<title>").count(), 3);
        assert_eq!(svg, chart.to_svg(), "deterministic");
    }
}
