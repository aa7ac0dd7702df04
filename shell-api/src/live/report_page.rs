//! `GET /live/drops/{id}/report`: the drop report (`drops::report`) as a page for the shop: the sell-through curve,
//! the per-second reservations, payments and refusals, and the funnel, drawn as inline SVG on the server (no script,
//! no asset from elsewhere), readable on a phone. Signed in like the event streams: `Authorization` or
//! `?access_token=`.

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use uuid::Uuid;

use super::streams::StreamCaller;
use crate::drops::report::{report_for, DropReport, Second};
use crate::error::ApiError;
use crate::AppState;

/// Most points a chart draws; a longer series is drawn in buckets (their mean per second).
const POINTS_MAX: usize = 600;
/// A chart's drawing area, in SVG units (it scales to the page's width).
const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 180.0;

/// The report page of a drop (the drop's seller, admin).
#[utoipa::path(get, path = "/live/drops/{id}/report", tag = "live",
    params(("id" = Uuid, Path, description = "The drop"),
        ("access_token" = Option<String>, Query, description = "A token, for a link opened in a browser")),
    responses((status = 200, description = "The drop report as a page: sell-through curve, per-second rates and the \
funnel, in inline SVG", content_type = "text/html", body = String),
        (status = 401, description = "A page asking to sign in: no token", content_type = "text/html", body = String),
        (status = 403, description = "A page saying the report is the drop's seller's", content_type = "text/html", body = String),
        (status = 404, description = "A page saying there is no such drop", content_type = "text/html", body = String)))]
pub async fn report_page(
    State(state): State<AppState>,
    caller: StreamCaller,
    axum::extract::Path(drop): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let Ok(drop) = Uuid::parse_str(&drop) else {
        return Ok(not_found());
    };
    let Some(member) = caller.0 else {
        return Ok(message(
            StatusCode::UNAUTHORIZED,
            "Sign in",
            "A drop's report is for its seller: open this page with your access token.",
        ));
    };
    let client = state.db.get().await?;
    let report = match report_for(&client, &member, drop).await {
        Ok(report) => report,
        Err(err) if err.status() == StatusCode::NOT_FOUND => return Ok(not_found()),
        Err(err) if err.status() == StatusCode::FORBIDDEN => {
            return Ok(message(
                StatusCode::FORBIDDEN,
                "Not yours",
                "A drop's report is for its seller and the shop's admins.",
            ))
        }
        Err(err) => return Err(err),
    };
    let page = render(&report);
    Ok(([(header::CACHE_CONTROL, "no-store")], Html(page)).into_response())
}

/// The live page's own "no such drop" page.
fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Html(super::page::NOT_FOUND_HTML)).into_response()
}

fn message(status: StatusCode, title: &str, text: &str) -> Response {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title></head>\
         <body style=\"font-family:system-ui,sans-serif;max-width:30rem;margin:3rem auto;padding:0 1rem\">\
         <h1>{title}</h1><p>{text}</p></body></html>"
    );
    (status, Html(page)).into_response()
}

/// The whole page. Everything in it is numbers, ids and times, so nothing needs escaping.
pub fn render(r: &DropReport) -> String {
    let mut page = String::with_capacity(16 * 1024);
    let sold_out = match (r.sold_out_at, r.seconds_to_sell_out) {
        (Some(at), Some(seconds)) => format!(
            "sold out at {} ({seconds:.1} s after opening)",
            at.to_rfc3339()
        ),
        _ => format!("{} of {} units left", r.stock - r.sold, r.stock),
    };
    let _ = write!(
        page,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Drop report</title><style>{STYLE}</style></head><body>\
         <h1>How the drop went</h1><p class=\"meta\">Drop <code>{}</code>, opened {}: {} of {} sold, {sold_out}; \
         peak {} reservations a second.</p>",
        r.drop_id,
        r.opened_at.to_rfc3339(),
        r.sold,
        r.stock,
        r.peak_reservations_per_second,
    );
    let points = buckets(&r.series);
    page.push_str("<h2>Sell-through</h2>");
    page.push_str(&sell_through(&points, r.stock));
    page.push_str("<h2>Each second</h2>");
    page.push_str(&rates(&points));
    page.push_str("<h2>Funnel</h2>");
    page.push_str(&funnel(r));
    page.push_str("</body></html>");
    page
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:48rem;margin:1rem auto;padding:0 1rem;\
color:#222}h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.5rem}.meta{color:#555}svg{width:100%;height:auto;\
background:#fafafa;border:1px solid #ddd}.legend span{margin-right:1rem}.reserved{color:#1f6feb}.paid{color:#1a7f37}\
.refused{color:#cf222e}";

/// One drawn point: the second it starts at and the mean per second of each count over its bucket.
#[derive(Debug, Clone, Copy)]
struct Point {
    second: f64,
    reserved: f64,
    paid: f64,
    refused: f64,
}

fn buckets(series: &[Second]) -> Vec<Point> {
    let size = series.len().div_ceil(POINTS_MAX).max(1);
    series
        .chunks(size)
        .map(|chunk| {
            let n = chunk.len() as f64;
            let sum = |f: fn(&Second) -> i64| chunk.iter().map(f).sum::<i64>() as f64 / n;
            Point {
                second: f64::from(chunk[0].second),
                reserved: sum(|s| s.reserved),
                paid: sum(|s| s.paid),
                refused: sum(|s| s.refused),
            }
        })
        .collect()
}

/// An SVG `points` attribute: `values` against `seconds`, scaled to the chart.
fn polyline(points: &[Point], value: impl Fn(&Point) -> f64, top: f64, class: &str) -> String {
    let last = points.last().map_or(1.0, |p| p.second.max(1.0));
    let mut attr = String::with_capacity(points.len() * 12);
    for p in points {
        let x = p.second / last * WIDTH;
        let y = HEIGHT - value(p) / top.max(1.0) * HEIGHT;
        let _ = write!(attr, "{x:.1},{y:.1} ");
    }
    format!("<polyline class=\"{class}\" fill=\"none\" stroke=\"currentColor\" stroke-width=\"2\" points=\"{}\"/>", attr.trim_end())
}

fn chart(body: &str, top: f64, last_second: f64) -> String {
    format!(
        "<svg viewBox=\"-40 -10 {w} {h}\" role=\"img\"><line x1=\"0\" y1=\"{HEIGHT}\" x2=\"{WIDTH}\" y2=\"{HEIGHT}\" \
         stroke=\"#999\"/><line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"{HEIGHT}\" stroke=\"#999\"/>\
         <text x=\"-36\" y=\"10\" font-size=\"11\">{top:.0}</text><text x=\"-12\" y=\"{HEIGHT}\" font-size=\"11\">0</text>\
         <text x=\"{WIDTH}\" y=\"{label}\" font-size=\"11\" text-anchor=\"end\">{last_second:.0} s</text>{body}</svg>",
        w = WIDTH + 50.0,
        h = HEIGHT + 30.0,
        label = HEIGHT + 16.0,
    )
}

/// Paid holds so far against the stock, second by second.
fn sell_through(points: &[Point], stock: i32) -> String {
    let mut running = 0.0;
    let size = points
        .get(1)
        .map_or(1.0, |p| (p.second - points[0].second).max(1.0));
    let cumulative: Vec<Point> = points
        .iter()
        .map(|p| {
            running += p.paid * size;
            Point {
                paid: running,
                ..*p
            }
        })
        .collect();
    let top = f64::from(stock.max(1));
    let last = points.last().map_or(0.0, |p| p.second);
    let body = polyline(&cumulative, |p| p.paid, top, "paid");
    format!(
        "{}<p class=\"legend\"><span class=\"paid\">&#9632; paid holds so far</span> against the stock ({stock})</p>",
        chart(&body, top, last)
    )
}

/// Reservations, payments and refusals per second.
fn rates(points: &[Point]) -> String {
    let top = points
        .iter()
        .map(|p| p.reserved.max(p.paid).max(p.refused))
        .fold(1.0, f64::max);
    let last = points.last().map_or(0.0, |p| p.second);
    let body = [
        polyline(points, |p| p.reserved, top, "reserved"),
        polyline(points, |p| p.paid, top, "paid"),
        polyline(points, |p| p.refused, top, "refused"),
    ]
    .concat();
    format!(
        "{}<p class=\"legend\"><span class=\"reserved\">&#9632; reserved</span><span class=\"paid\">&#9632; paid</span>\
         <span class=\"refused\">&#9632; refused</span> per second</p>",
        chart(&body, top, last)
    )
}

/// From attempts to paid, as bars.
fn funnel(r: &DropReport) -> String {
    let f = &r.funnel;
    let refused = f.refused_sold_out + f.refused_limit + f.refused_overload;
    let rows = [
        ("attempts", f.reserved + refused, "#555"),
        ("reserved", f.reserved, "#1f6feb"),
        ("paid", f.paid, "#1a7f37"),
        ("expired", f.expired, "#9a6700"),
        ("cancelled", f.cancelled, "#9a6700"),
        ("declined", f.declined, "#9a6700"),
        ("refused: sold out", f.refused_sold_out, "#cf222e"),
        ("refused: over the limit", f.refused_limit, "#cf222e"),
        ("refused: overloaded", f.refused_overload, "#cf222e"),
    ];
    let top = rows.iter().map(|row| row.1).max().unwrap_or(1).max(1) as f64;
    let mut svg = format!(
        "<svg class=\"funnel\" viewBox=\"0 0 {WIDTH} {}\" role=\"img\">",
        rows.len() * 24
    );
    for (i, (label, count, color)) in rows.iter().enumerate() {
        let y = i * 24;
        let width = (*count as f64 / top * (WIDTH - 220.0)).max(1.0);
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{label}</text><rect class=\"bar\" x=\"160\" y=\"{}\" \
             width=\"{width:.1}\" height=\"16\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"12\">{count}</text>",
            y + 14,
            y + 2,
            166.0 + width,
            y + 14,
        );
    }
    svg.push_str("</svg>");
    svg
}
