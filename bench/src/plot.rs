//! PNG plots of the bypass/kernel ratios by message size.
use crate::report::{Results, size_label};
use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// plotters (ab_glyph) draws text only with a registered font: register DejaVu Sans
/// as "sans-serif" (bench/deps.sh installs fonts-dejavu-core).
pub fn register_font() -> Result<()> {
    let path = FONT_PATHS
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| anyhow!("no DejaVu Sans font found (apt-get install fonts-dejavu-core, see bench/deps.sh)"))?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| anyhow!("{path}: not a usable font"))?;
    Ok(())
}

struct Series {
    label: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

fn draw(
    path: &Path,
    title: &str,
    y_label: &str,
    sizes: &[u32],
    series: &[Series],
    guides: &[(f64, &str)],
    legend: SeriesLabelPosition,
) -> Result<()> {
    let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let xmin = (*sizes.first().unwrap_or(&1) as f64).log2();
    let xmax = (*sizes.last().unwrap_or(&16384) as f64).log2();
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(guides.iter().map(|g| g.0))
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        * 1.12;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(18)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((xmin - 0.3)..(xmax + 0.3), 0.0..ymax)
        .map_err(|e| anyhow!("{e:?}"))?;
    let label_sizes: Vec<u32> = sizes.to_vec();
    chart
        .configure_mesh()
        .x_desc("message size")
        .y_desc(y_label)
        .x_labels(((xmax - xmin) as usize + 2).max(2))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(210, 210, 210))
        .x_label_formatter(&|x| {
            let s = 2f64.powf(*x).round() as u32;
            if label_sizes.contains(&s) && (x - x.round()).abs() < 1e-6 { size_label(s) } else { String::new() }
        })
        .y_labels(12)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    for (y, name) in guides {
        // Targets in red, the "no change" line in grey.
        let color = if name.starts_with("no change") { RGBColor(90, 90, 90) } else { RGBColor(214, 39, 40) };
        let style = ShapeStyle::from(&color).stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(vec![(xmin - 0.3, *y), (xmax + 0.3, *y)], 6, 4, style))
            .map_err(|e| anyhow!("{e:?}"))?
            .label(name.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    for s in series {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.1.is_finite()).collect();
        if pts.is_empty() {
            continue;
        }
        let style = ShapeStyle::from(&s.color).stroke_width(3);
        let c = s.color;
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts.clone(), 10, 6, style))
                .map_err(|e| anyhow!("{e:?}"))?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        } else {
            chart
                .draw_series(LineSeries::new(pts.clone(), style))
                .map_err(|e| anyhow!("{e:?}"))?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        }
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 5, s.color.filled())))
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

fn series(r: &Results, topo: &str, test: &str, label: &str, color: RGBColor, dashed: bool) -> Series {
    Series {
        label: label.into(),
        color,
        dashed,
        points: r
            .run
            .sizes
            .iter()
            .filter_map(|s| r.point(topo, test, *s).map(|p| ((*s as f64).log2(), p.ratio)))
            .collect(),
    }
}

/// AF_UNIX / kernel TCP on loopback: how far below the TCP stack the floor is.
fn floor(r: &Results, unix_test: &str, tcp_test: &str, label: &str) -> Series {
    Series {
        label: label.into(),
        color: RGBColor(150, 150, 150),
        dashed: true,
        points: r
            .run
            .sizes
            .iter()
            .filter_map(|s| {
                let u = r.unix.iter().find(|u| u.test == unix_test && u.size == *s)?;
                let p = r.point("loopback", tcp_test, *s)?;
                Some(((*s as f64).log2(), u.median / p.kernel_median))
            })
            .collect(),
    }
}

pub fn plots(r: &Results, out: &Path) -> Result<()> {
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let lat = [
        series(r, "loopback", "tcp_lat_pinned", "loopback, pinned", blue, false),
        series(r, "veth", "tcp_lat_pinned", "veth, pinned", orange, false),
        series(r, "loopback", "tcp_lat", "loopback, unpinned (dashed)", blue, true),
        series(r, "veth", "tcp_lat", "veth, unpinned (dashed)", orange, true),
        floor(r, "lat_pinned", "tcp_lat_pinned", "AF_UNIX / loopback kernel TCP, pinned (floor, dashed)"),
    ];
    draw(
        &out.join("latency.png"),
        "tcp_lat: bypass / kernel latency (lower is better)",
        "latency ratio",
        &r.run.sizes,
        &lat,
        &[(0.6, "target ≤ 0.6"), (1.0, "no change")],
        // Ratios sit between ~0.45 and 1: the bottom of the chart is free.
        SeriesLabelPosition::LowerLeft,
    )?;
    let bw = [
        series(r, "loopback", "tcp_bw", "loopback", blue, false),
        series(r, "veth", "tcp_bw", "veth", orange, false),
        floor(r, "bw", "tcp_bw", "AF_UNIX / loopback kernel TCP (floor, dashed)"),
    ];
    draw(
        &out.join("bandwidth.png"),
        "tcp_bw: bypass / kernel bandwidth (higher is better)",
        "bandwidth ratio",
        &r.run.sizes,
        &bw,
        &[(1.0, "no change"), (3.0, "veth target ≥ 3 (≥ 1 KB)")],
        SeriesLabelPosition::UpperLeft,
    )?;
    Ok(())
}
