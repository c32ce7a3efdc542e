//! results.png: new connections per second and programming time against the number of
//! Services, one line per datapath. Drawn with plotters' bitmap backend; text needs a
//! TrueType font from the system (fonts-dejavu-core, installed by scripts/setup.sh).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::{prelude::*, style::FontStyle};
use serde_json::Value;

use super::{lab::Datapath, num};

const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no DejaVuSans.ttf (Debian: fonts-dejavu-core; scripts/setup.sh installs it)")?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    // plotters keeps the font for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path}: not a usable font"))
}

fn color(dp: Datapath) -> RGBColor {
    match dp {
        Datapath::Pod => RGBColor(120, 120, 120),
        Datapath::LbAgent => RGBColor(31, 119, 180),
        Datapath::LbAgentXdp => RGBColor(44, 160, 44),
        Datapath::Iptables => RGBColor(214, 39, 40),
        Datapath::Nftables => RGBColor(255, 127, 14),
    }
}

/// (Services, value) for each datapath that has the value.
fn series(rows: &[Value], dp: Datapath, path: &[&str]) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| {
            let n = r["services"].as_f64()?;
            let v = num(&r["datapaths"][dp.key()], path)?;
            Some((n, v))
        })
        .collect()
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    rows: &[Value],
    title: &str,
    // The axes' descriptions: x, y.
    [x_desc, y_desc]: [&str; 2],
    path: &[&str],
    datapaths: &[Datapath],
    log_y: bool,
) -> Result<()> {
    let all: Vec<Series> = datapaths
        .iter()
        .map(|&dp| (dp, series(rows, dp, path)))
        .collect();
    let xs = all.iter().flat_map(|(_, s)| s.iter().map(|p| p.0));
    let x_max = xs.fold(10.0f64, f64::max) * 2.0;
    let ys: Vec<f64> = all
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .collect();
    let y_max = ys.iter().copied().fold(1.0f64, f64::max);
    let y_min = ys
        .iter()
        .copied()
        .filter(|y| *y > 0.0)
        .fold(f64::MAX, f64::min);
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(76);
    let x_range = (0.5f64..x_max).log_scale();
    if log_y {
        let lo = if y_min == f64::MAX { 0.1 } else { y_min / 3.0 };
        let mut chart = b
            .build_cartesian_2d(x_range, (lo..y_max * 3.0).log_scale())
            .map_err(|e| anyhow!("{e}"))?;
        draw_lines(&mut chart, &all, x_desc, y_desc)
    } else {
        let mut chart = b
            .build_cartesian_2d(x_range, 0f64..y_max * 1.15)
            .map_err(|e| anyhow!("{e}"))?;
        draw_lines(&mut chart, &all, x_desc, y_desc)
    }
}

type Series = (Datapath, Vec<(f64, f64)>);

fn draw_lines<'a, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<LogCoord<f64>, Y>>,
    all: &[Series],
    x_desc: &str,
    y_desc: &str,
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (dp, s) in all {
        let c = color(*dp);
        chart
            .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(3)))
            .map_err(|e| anyhow!("{e}"))?
            .label(dp.title())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], c.stroke_width(3)));
        chart
            .draw_series(s.iter().map(|&p| Circle::new(p, 5, c.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

/// Draws the two panels into `path` (PNG); the lab's Services had `endpoints` endpoints each
/// (the in-process ones always 4).
pub fn draw(rows: &[Value], path: &Path, endpoints: usize) -> Result<()> {
    let lab_x = format!("Services ({endpoints} endpoint(s) each)");
    let programming_x = if endpoints == 4 {
        lab_x.clone()
    } else {
        format!("Services (lb-agent: 4 endpoints each; kube-proxy: {endpoints})")
    };
    register_font()?;
    let root = BitMapBackend::new(path, (1500, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(750);
    panel(
        &left,
        rows,
        "New connections per second (pod → ClusterIP)",
        [&lab_x, "connections / s"],
        &["new_connections_inside", "per_second"],
        // The XDP variant differs from lb-agent on the uplink only, not on this path.
        &[
            Datapath::Pod,
            Datapath::LbAgent,
            Datapath::Iptables,
            Datapath::Nftables,
        ],
        false,
    )?;
    panel(
        &right,
        rows,
        "Time to program all Services",
        [&programming_x, "ms (log)"],
        &["programming_ms"],
        &[Datapath::LbAgent, Datapath::Iptables, Datapath::Nftables],
        true,
    )?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
