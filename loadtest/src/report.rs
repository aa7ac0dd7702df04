//! goose's HTML report, made self-contained. goose 0.19 draws the report's charts with ECharts loaded from a CDN,
//! so on a machine without internet (a load rig inside a private network, CI) the charts are empty boxes. After goose
//! writes an HTML report, its one `<script src=...echarts...>` tag is replaced by the same version of the library,
//! vendored under `loadtest/vendor/echarts` (with its licence) and compiled into the binary.

use std::path::Path;

use anyhow::Context;

/// The tag goose 0.19's report template loads ECharts with (`goose/src/report.rs`).
pub const ECHARTS_CDN_TAG: &str =
    r#"<script src="https://cdn.jsdelivr.net/npm/echarts@5.2.2/dist/echarts.min.js"></script>"#;
/// The version in that tag, which the vendored copy must be.
const ECHARTS_VERSION: &str = "5.2.2";
/// Apache ECharts 5.2.2, `dist/echarts.min.js` from its npm package, unchanged (Apache-2.0, licence beside it).
const ECHARTS_JS: &str = include_str!("../vendor/echarts/echarts.min.js");

/// The report with the CDN tag replaced by the library inline. An HTML report without that tag means goose changed
/// its template: an error, rather than a report whose charts silently stay empty.
pub fn inline_echarts(html: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        html.contains(ECHARTS_CDN_TAG),
        "goose's HTML report does not load ECharts the way goose 0.19 does; loadtest/src/report.rs needs updating"
    );
    let inline = format!(
        "<!-- Apache ECharts {ECHARTS_VERSION} (Apache-2.0), inlined by flashsale-load from loadtest/vendor/echarts \
         so the charts draw without network -->\n    <script>{ECHARTS_JS}</script>"
    );
    Ok(html.replacen(ECHARTS_CDN_TAG, &inline, 1))
}

/// Rewrites each HTML report among `files` (goose writes `.html`, `.json` and `.md` reports) to draw offline.
pub fn make_offline(files: &[String]) -> anyhow::Result<()> {
    for file in files.iter().filter(|f| f.ends_with(".html")) {
        let path = Path::new(file);
        let html = std::fs::read_to_string(path)
            .with_context(|| format!("reading goose's report {file}"))?;
        std::fs::write(path, inline_echarts(&html)?)
            .with_context(|| format!("writing the self-contained report {file}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendored_library_is_the_version_goose_names_and_inlines_safely() {
        assert!(
            ECHARTS_CDN_TAG.contains(&format!("echarts@{ECHARTS_VERSION}/")),
            "{ECHARTS_CDN_TAG}"
        );
        assert!(
            ECHARTS_JS.contains(&format!("version=\"{ECHARTS_VERSION}\"")),
            "the vendored echarts.min.js is not {ECHARTS_VERSION}"
        );
        // Inside an inline <script>, `</script` would end the element early.
        assert!(!ECHARTS_JS.to_ascii_lowercase().contains("</script"));
    }

    #[test]
    fn the_cdn_tag_is_replaced_by_the_library() {
        let html = format!("<head>\n    {ECHARTS_CDN_TAG}\n</head><body>echarts.init(x)</body>");
        let offline = inline_echarts(&html).unwrap_or_default();
        assert!(!offline.contains("cdn.jsdelivr.net"), "the CDN is gone");
        assert!(offline.contains(ECHARTS_JS), "the library is inline");
        assert!(offline.ends_with("</head><body>echarts.init(x)</body>"));
        assert!(
            inline_echarts("<head></head>").is_err(),
            "a report without the tag is an error"
        );
    }
}
