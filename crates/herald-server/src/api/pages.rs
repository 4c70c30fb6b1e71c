//! The demo pages and the browser client, compiled into the binary so one file
//! is all there is to deploy. Plain HTML, CSS and ES modules: no build step.

use axum::{
    http::{HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::edge::error::ApiError;

/// (URL path, file contents, content type).
pub(crate) const ASSETS: &[(&str, &str, &str)] = &[
    ("/", include_str!("../../assets/index.html"), "text/html; charset=utf-8"),
    ("/chat", include_str!("../../assets/chat.html"), "text/html; charset=utf-8"),
    ("/bell", include_str!("../../assets/bell.html"), "text/html; charset=utf-8"),
    ("/admin", include_str!("../../assets/admin.html"), "text/html; charset=utf-8"),
    ("/style.css", include_str!("../../assets/style.css"), "text/css; charset=utf-8"),
    ("/herald.js", include_str!("../../assets/herald.js"), "text/javascript; charset=utf-8"),
    // MQTT.js (MIT; see assets/vendor/mqtt.LICENSE.txt), loaded by herald.js
    // only when the 'mqtt' transport is used.
    ("/vendor/mqtt.min.js", include_str!("../../assets/vendor/mqtt.min.js"), "text/javascript; charset=utf-8"),
];

/// Serves an asset by path, or the JSON 404 every unknown route gets.
pub(crate) async fn asset(method: Method, uri: axum::http::Uri) -> Response {
    match ASSETS.iter().find(|(path, _, _)| *path == uri.path()) {
        Some(_) if method != Method::GET && method != Method::HEAD => {
            let mut res = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on this route"),
            )
            .into_response();
            // RFC 9110, 15.5.6: a 405 says what is allowed (schemathesis
            // found it missing on the pages).
            res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET,HEAD"));
            res
        }
        Some((_, body, content_type)) => {
            let mut res = (*body).into_response();
            res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            res
        }
        None => ApiError::not_found().into_response(),
    }
}
