//! `bench/report.svg`: a grouped bar chart, one group per workload, one bar per
//! backend, each bar scaled to the best backend of its group (so IOPS and MiB/s
//! rows share one axis) and labelled with its absolute value.

use std::fmt::Write as _;

use super::plan::{self, Engine};
use super::report::{all_stats, num};
use super::CompareOutput;

const BAR: f64 = 16.0;
const GAP: f64 = 26.0;
const PLOT_H: f64 = 260.0;
const TOP: f64 = 110.0;
const LEFT: f64 = 50.0;

fn color(engine: Engine, id: &str) -> &'static str {
    match engine {
        Engine::Blkstack => "#1f77b4",
        Engine::Ch => "#2ca02c",
        Engine::Qsd(_) if id.starts_with("qsd-threads") || id.starts_with("qsd-native") => {
            "#fdae6b"
        }
        Engine::Qsd(_) => "#ff7f0e",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart as an SVG document.
pub fn chart(out: &CompareOutput) -> String {
    let st = all_stats(out);
    let ws: Vec<_> = plan::workloads()
        .into_iter()
        .filter(|w| out.workloads.iter().any(|x| x == w.id))
        .collect();
    let group_w: Vec<f64> = ws
        .iter()
        .map(|w| w.backends.len() as f64 * BAR + GAP)
        .collect();
    let width = (LEFT + group_w.iter().sum::<f64>() + 20.0).max(720.0);
    let height = TOP + PLOT_H + 90.0;
    let base = TOP + PLOT_H;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"10\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">blkstack vs qemu-storage-daemon vs \
         cloud-hypervisor vhost_user_block</text>\n\
         <text x=\"{LEFT}\" y=\"58\" font-size=\"10\" fill=\"#555\">Medians of {} round(s) × {} s; \
         each group scaled to its best backend; labels are IOPS (MiB/s for 1M reads).</text>\n",
        out.rounds,
        out.seconds
    );
    let legend = [
        ("blkstack", "#1f77b4"),
        ("QSD io_uring", "#ff7f0e"),
        ("QSD threads / native", "#fdae6b"),
        ("CH vhost_user_block", "#2ca02c"),
    ];
    let mut lx = LEFT;
    for (name, c) in legend {
        let _ = writeln!(s, "<rect x=\"{lx}\" y=\"30\" width=\"10\" height=\"10\" fill=\"{c}\"/><text x=\"{}\" y=\"39\">{name}</text>", lx + 14.0);
        lx += 30.0 + name.len() as f64 * 6.0;
    }
    for frac in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let y = base - frac * PLOT_H;
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.0}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}%</text>",
            width - 20.0,
            LEFT - 4.0,
            y + 3.0,
            frac * 100.0
        );
    }
    let mut x = LEFT + GAP / 2.0;
    for (w, gw) in ws.iter().zip(&group_w) {
        let val = |id: &str| {
            st.get(&(w.id.to_string(), id.to_string()))
                .filter(|x| x.n > 0)
                .map(|x| if w.throughput { x.mib_s } else { x.iops })
        };
        let best = w
            .backends
            .iter()
            .filter_map(|b| val(&b.id()))
            .fold(0.0, f64::max);
        for (i, b) in w.backends.iter().enumerate() {
            let bx = x + i as f64 * BAR;
            let Some(v) = val(&b.id()) else { continue };
            let h = if best > 0.0 { v / best * PLOT_H } else { 0.0 };
            let _ = writeln!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{}: {}</title></rect>",
                base - h,
                BAR - 2.0,
                color(b.engine, &b.id()),
                esc(&b.title()),
                num(v)
            );
            let ty = base - h - 3.0;
            let _ = writeln!(
                s,
                "<text transform=\"translate({:.1},{ty:.1}) rotate(-90)\" font-size=\"9\">{}</text>",
                bx + BAR / 2.0 + 2.0,
                num(v)
            );
        }
        let cx = x + (gw - GAP) / 2.0;
        let _ = writeln!(
            s,
            "<text transform=\"translate({cx:.1},{:.1}) rotate(35)\" font-size=\"10\">{}</text>",
            base + 12.0,
            esc(w.id)
        );
        x += gw;
    }
    s += "</svg>\n";
    s
}
