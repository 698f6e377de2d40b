//! SVG plot of machines applied over time per site.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use plotters::prelude::*;

use crate::fleet::Fleet;

pub fn rollout_svg(
    path: &Path,
    fleet: &Fleet,
    seen: &BTreeMap<String, Instant>,
    t0: Instant,
    sites: usize,
) -> anyhow::Result<()> {
    let mut series: Vec<Vec<(f64, f64)>> = vec![Vec::new(); sites.max(1)];
    let mut times: Vec<(f64, usize)> = seen
        .iter()
        .filter_map(|(name, t)| {
            fleet.machines.iter().find(|m| &m.name == name).map(|m| (t.duration_since(t0).as_secs_f64(), m.site))
        })
        .collect();
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut counts = vec![0usize; sites.max(1)];
    for (t, site) in times {
        counts[site] += 1;
        series[site].push((t, counts[site] as f64));
    }
    let max_t = series.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
    let max_n = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Machines at the new commit, per site", ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_t * 1.05, 0.0..max_n * 1.05)?;
    chart.configure_mesh().x_desc("seconds since the commit bump").y_desc("machines applied").draw()?;
    for (i, pts) in series.into_iter().enumerate() {
        let color = Palette99::pick(i);
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(Fleet::site_name(i))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
