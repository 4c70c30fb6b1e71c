//! `GET /api/openapi.json`: the OpenAPI 3.1 description of every HTTP route
//! (`assets/openapi.json`, compiled in). It is kept true by tests: one here
//! checks that it names every route of the route table with its methods
//! (and nothing that is not routed); `tests/api` validates it with
//! `openapi-spec-validator` and runs `schemathesis` against a live server,
//! which checks every answer against it.

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};

pub(crate) const DOCUMENT: &str = include_str!("../../assets/openapi.json");

pub(crate) async fn openapi() -> Response {
    let mut res = DOCUMENT.into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::DOCUMENT;

    /// (path, methods) of every `.route(..)` in the route table's source.
    fn routed() -> BTreeMap<String, BTreeSet<String>> {
        let src = include_str!("../routes.rs");
        let app = &src[src.find("pub fn app(").expect("the app function")..];
        let app = &app[..app.find("\n}\n").expect("its end")];
        let mut out = BTreeMap::new();
        for part in app.split(".route(").skip(1) {
            let path = part.split('"').nth(1).expect("a quoted path").to_owned();
            // The handlers up to the next route or layer.
            let handlers = part.split(".route(").next().unwrap_or(part);
            let methods = ["get", "post", "put", "delete", "patch"]
                .into_iter()
                .filter(|m| handlers.contains(&format!("{m}(")))
                .map(String::from)
                .collect();
            out.insert(path, methods);
        }
        out
    }

    fn described() -> BTreeMap<String, BTreeSet<String>> {
        let doc: Value = serde_json::from_str(DOCUMENT).expect("the description is JSON");
        doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .map(|(p, ops)| (p.clone(), ops.as_object().expect("operations").keys().cloned().collect()))
            .collect()
    }

    /// What `/api/channels/{*path}` serves, as the description spells it:
    /// the channel is one (percent-encodable) parameter, the resource a
    /// literal segment after it.
    fn channel_routes() -> BTreeMap<String, BTreeSet<String>> {
        let one = |m: &str| BTreeSet::from([m.to_owned()]);
        BTreeMap::from([
            ("/api/channels/{channel}".to_owned(), one("post")),
            ("/api/channels/{channel}/messages".to_owned(), one("get")),
            ("/api/channels/{channel}/events".to_owned(), one("get")),
            ("/api/channels/{channel}/iframe".to_owned(), one("get")),
        ])
    }

    #[test]
    fn the_description_names_every_route_and_nothing_else() {
        let mut expected = BTreeMap::new();
        for (path, methods) in routed() {
            if path == "/api/channels/{*path}" {
                assert_eq!(methods, BTreeSet::from(["get".into(), "post".into()]), "the channel routes changed");
                expected.extend(channel_routes());
            } else {
                expected.insert(path, methods);
            }
        }
        for (path, _, _) in crate::api::pages::ASSETS {
            expected.insert((*path).to_owned(), BTreeSet::from(["get".to_owned()]));
        }
        assert!(expected.contains_key("/api/openapi.json") && expected.contains_key("/metrics"));
        let described = described();
        for (path, methods) in &expected {
            assert_eq!(described.get(path), Some(methods), "{path} {methods:?} is routed but not described so");
        }
        for path in described.keys() {
            assert!(expected.contains_key(path), "{path} is described but not routed");
        }
    }

    #[test]
    fn every_error_code_of_the_description_is_in_the_architecture_table() {
        let table = include_str!("../../../../ARCHITECTURE.md");
        let doc: Value = serde_json::from_str(DOCUMENT).unwrap();
        let mut codes = 0;
        for (name, r) in doc["components"]["responses"].as_object().unwrap() {
            let status = name.trim_start_matches("Error");
            let listed = &r["content"]["application/json"]["schema"]["allOf"][1]["properties"]["code"]["enum"];
            for code in listed.as_array().unwrap() {
                let code = code.as_str().unwrap();
                let row = table
                    .lines()
                    .find(|l| l.starts_with('|') && l.contains(&format!("`{code}`")))
                    .unwrap_or_else(|| panic!("{code} is not in ARCHITECTURE.md's table"));
                assert!(row.contains(status), "{code} is {status} in the description; ARCHITECTURE.md says: {row}");
                codes += 1;
            }
        }
        assert!(codes > 20, "{codes}");
    }

    #[test]
    fn the_description_is_this_version() {
        let doc: Value = serde_json::from_str(DOCUMENT).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    }
}
