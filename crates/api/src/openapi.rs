//! The node's one OpenAPI document, assembled from parts: this crate holds
//! the base (document info, the error envelope's schemas and responses,
//! `/openapi.json` itself) and each crate that serves HTTP owns a fragment
//! of its own paths, tags and schemas (`meshwork_coord::api::OPENAPI`,
//! `meshwork_gateway::OPENAPI`, `meshwork_console::OPENAPI`); whoever mounts
//! the routers [`merge`]s the fragments of what it serves.
//!
//! A fragment is a JSON object with `tags`, `paths` and `components` as in
//! OpenAPI 3.1, and optionally a `description` appended to the document's.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use serde_json::{Map, Value};

/// The base document the fragments are merged into.
pub const BASE: &str = include_str!("../openapi.json");

/// Why fragments could not be merged (a bug in a crate's fragment, found by
/// its tests).
#[derive(Debug, thiserror::Error)]
pub enum OpenApiError {
    /// A fragment (or the base) is not JSON.
    #[error("an OpenAPI fragment is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A fragment is not an object, or one of its sections has the wrong shape.
    #[error("an OpenAPI fragment's `{0}` is not what OpenAPI expects there")]
    Shape(String),
    /// Two fragments define the same path, tag or component.
    #[error("the OpenAPI {kind} `{name}` is defined twice")]
    Duplicate {
        /// `path`, `tag` or the component kind (`schemas`, ...).
        kind: String,
        /// Its name.
        name: String,
    },
}

/// The base document with `fragments` merged in, in order. Paths, tags and
/// components must be unique across all of them.
pub fn merge(fragments: &[&str]) -> Result<Value, OpenApiError> {
    let mut doc: Value = serde_json::from_str(BASE)?;
    for text in fragments {
        let fragment: Value = serde_json::from_str(text)?;
        let Value::Object(fragment) = fragment else {
            return Err(OpenApiError::Shape("fragment".into()));
        };
        merge_one(&mut doc, fragment)?;
    }
    Ok(doc)
}

/// Merges one fragment into `doc`.
fn merge_one(doc: &mut Value, fragment: Map<String, Value>) -> Result<(), OpenApiError> {
    for (key, value) in fragment {
        match key.as_str() {
            "paths" => insert_unique(object(doc, "paths")?, as_object(value, "paths")?, "path")?,
            "components" => {
                for (kind, items) in as_object(value, "components")? {
                    let items = as_object(items, &kind)?;
                    let into = object(object_value(doc, "components")?, &kind)?;
                    insert_unique(into, items, &kind)?;
                }
            }
            "tags" => {
                let Value::Array(new) = value else {
                    return Err(OpenApiError::Shape("tags".into()));
                };
                let tags = doc
                    .as_object_mut()
                    .ok_or_else(|| OpenApiError::Shape("document".into()))?
                    .entry("tags")
                    .or_insert_with(|| Value::Array(Vec::new()));
                let Value::Array(tags) = tags else {
                    return Err(OpenApiError::Shape("tags".into()));
                };
                for t in new {
                    let name = t["name"].as_str().unwrap_or_default().to_owned();
                    if tags.iter().any(|x| x["name"] == name.as_str()) {
                        return Err(OpenApiError::Duplicate {
                            kind: "tag".into(),
                            name,
                        });
                    }
                    tags.push(t);
                }
            }
            "description" => {
                let (Some(extra), Some(d)) = (
                    value.as_str(),
                    doc.pointer_mut("/info/description")
                        .and_then(|d| d.as_str().map(str::to_owned)),
                ) else {
                    return Err(OpenApiError::Shape("description".into()));
                };
                doc["info"]["description"] = Value::String(format!("{d}\n\n{extra}"));
            }
            other => return Err(OpenApiError::Shape(other.to_owned())),
        }
    }
    Ok(())
}

/// `parent[key]` as an object, created when absent.
fn object<'a>(
    parent: &'a mut Value,
    key: &str,
) -> Result<&'a mut Map<String, Value>, OpenApiError> {
    object_value(parent, key)?
        .as_object_mut()
        .ok_or_else(|| OpenApiError::Shape(key.to_owned()))
}

/// `parent[key]`, an empty object when absent.
fn object_value<'a>(parent: &'a mut Value, key: &str) -> Result<&'a mut Value, OpenApiError> {
    Ok(parent
        .as_object_mut()
        .ok_or_else(|| OpenApiError::Shape(key.to_owned()))?
        .entry(key)
        .or_insert_with(|| Value::Object(Map::new())))
}

fn as_object(v: Value, what: &str) -> Result<Map<String, Value>, OpenApiError> {
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(OpenApiError::Shape(what.to_owned())),
    }
}

fn insert_unique(
    into: &mut Map<String, Value>,
    items: Map<String, Value>,
    kind: &str,
) -> Result<(), OpenApiError> {
    for (name, item) in items {
        if into.contains_key(&name) {
            return Err(OpenApiError::Duplicate {
                kind: kind.to_owned(),
                name,
            });
        }
        into.insert(name, item);
    }
    Ok(())
}

/// A router answering `GET /openapi.json` with `document`.
pub fn router<S: Clone + Send + Sync + 'static>(document: &Value) -> Router<S> {
    let body = document.to_string();
    Router::new().route(
        "/openapi.json",
        axum::routing::get(move || {
            let body = body.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body,
                )
                    .into_response()
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_base_alone_documents_the_envelope_and_itself() {
        let doc = merge(&[]).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        assert!(doc["paths"]["/openapi.json"]["get"].is_object());
        assert!(doc["components"]["schemas"]["Error"].is_object());
    }

    #[test]
    fn fragments_add_paths_tags_components_and_description() {
        let a = r#"{"tags":[{"name":"a"}],"paths":{"/a":{}},"components":{"schemas":{"A":{}},"parameters":{"p":{}}},"description":"About a."}"#;
        let doc = merge(&[a]).unwrap();
        assert!(doc["paths"]["/a"].is_object());
        assert!(doc["components"]["schemas"]["A"].is_object());
        assert!(doc["components"]["parameters"]["p"].is_object());
        assert!(
            doc["tags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == "a")
        );
        assert!(
            doc["info"]["description"]
                .as_str()
                .unwrap()
                .ends_with("\n\nAbout a.")
        );
    }

    #[test]
    fn a_second_definition_is_refused() {
        let a = r#"{"paths":{"/a":{}}}"#;
        let err = merge(&[a, a]).unwrap_err().to_string();
        assert_eq!(err, "the OpenAPI path `/a` is defined twice");
        let s = r#"{"components":{"schemas":{"Error":{}}}}"#;
        assert!(matches!(
            merge(&[s]),
            Err(OpenApiError::Duplicate { kind, name }) if kind == "schemas" && name == "Error"
        ));
        assert!(matches!(merge(&["[]"]), Err(OpenApiError::Shape(_))));
        assert!(matches!(
            merge(&[r#"{"servers":[]}"#]),
            Err(OpenApiError::Shape(_))
        ));
    }
}
