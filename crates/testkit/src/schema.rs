//! One JSON Schema checker for every OpenAPI contract test: the subset of
//! JSON Schema 2020-12 our documents use (`type`, `enum`, `minimum`/`maximum`,
//! `required`, `properties`, `additionalProperties`, `items`, `allOf`,
//! `anyOf`, `oneOf`, local `$ref`s). Strict: an object property the schema
//! does not declare is an error, so a document cannot fall behind the code.

use std::collections::HashSet;

use serde_json::{Value, json};

/// An OpenAPI document whose schemas check JSON values.
pub struct Spec {
    /// The whole OpenAPI document.
    pub doc: Value,
}

impl Spec {
    /// Follows `$ref`s to the schema (or response, parameter) they name.
    pub fn resolve<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        for _ in 0..32 {
            match v.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    v = self
                        .doc
                        .pointer(r.strip_prefix('#').expect("local $ref"))
                        .unwrap_or_else(|| panic!("unresolved $ref {r}"));
                }
                None => return v,
            }
        }
        panic!("$ref cycle");
    }

    /// A `$ref` to component schema `name`.
    pub fn schema(&self, name: &str) -> Value {
        json!({ "$ref": format!("#/components/schemas/{name}") })
    }

    /// Asserts that the document lists exactly `routes` (`(method, path)`, lowercase
    /// methods) among the paths marked `x-meshwork-role: role`.
    pub fn assert_routes(&self, role: &str, routes: &[(&str, &str)]) {
        let documented: std::collections::BTreeSet<(String, String)> = self.doc["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, i)| i["x-meshwork-role"] == role)
            .flat_map(|(p, i)| {
                i.as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k)
                    .filter(|k| ["get", "post", "put", "delete", "patch"].contains(&k.as_str()))
                    .map(move |m| (m.clone(), p.clone()))
            })
            .collect();
        let routed = routes
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(
            documented, routed,
            "the {role} routes and their document differ"
        );
    }

    /// Asserts that an answer is documented: `status` is listed for `method` on `path`
    /// and `body` validates, in full and at every depth, against its schema.
    pub fn check_response(&self, path: &str, method: &str, status: u16, body: &Value) {
        let resp = self.resolve(&self.doc["paths"][path][method]["responses"][status.to_string()]);
        assert!(!resp.is_null(), "{method} {path} answered {status}: {body}");
        if let Some(schema) = resp.pointer("/content/application~1json/schema") {
            let errs = self.validate(schema, body);
            assert!(
                errs.is_empty(),
                "{method} {path} {status}: {errs:#?}\n{body}"
            );
        }
    }

    /// The problems of `v` against `schema` (empty when it validates).
    pub fn validate(&self, schema: &Value, v: &Value) -> Vec<String> {
        let mut errs = Vec::new();
        self.check(schema, v, "$", &mut errs);
        errs
    }

    /// Validates `v` against `schema`; problems go to `errs`, each naming where.
    pub fn check(&self, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        self.check_inner(schema, v, at, errs, true);
    }

    /// `strict`: flag object properties the schema (with its `allOf` parts) does not
    /// declare. Off for the parts of an `allOf`, which see only their own properties.
    fn check_inner(
        &self,
        schema: &Value,
        v: &Value,
        at: &str,
        errs: &mut Vec<String>,
        strict: bool,
    ) {
        let schema = self.resolve(schema);
        if let Some(t) = schema.get("type") {
            let types: Vec<&str> = match t {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => panic!("bad `type` {t}"),
            };
            if !types.iter().any(|t| type_matches(t, v)) {
                errs.push(format!("{at}: {} is not of type {types:?}", short(v)));
                return;
            }
        }
        if let Some(e) = schema.get("enum").and_then(Value::as_array)
            && !e.contains(v)
        {
            errs.push(format!("{at}: {} is not one of {e:?}", short(v)));
        }
        if let Some(n) = v.as_f64() {
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && n < min
            {
                errs.push(format!("{at}: {n} is below the minimum {min}"));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && n > max
            {
                errs.push(format!("{at}: {n} is above the maximum {max}"));
            }
        }
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.check_inner(s, v, at, errs, false);
            }
        }
        for (kw, exactly_one) in [("anyOf", false), ("oneOf", true)] {
            if let Some(branches) = schema.get(kw).and_then(Value::as_array) {
                let mut fails = Vec::new();
                for s in branches {
                    let mut e = Vec::new();
                    self.check_inner(s, v, at, &mut e, true);
                    fails.push(e);
                }
                let ok = fails.iter().filter(|e| e.is_empty()).count();
                if ok == 0 || (exactly_one && ok > 1) {
                    errs.push(format!(
                        "{at}: {} matches {ok} of the {kw} branches; failures: {fails:?}",
                        short(v)
                    ));
                }
            }
        }
        match v {
            Value::Object(m) => {
                for r in schema
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    if !m.contains_key(r) {
                        errs.push(format!("{at}: required property {r:?} is missing"));
                    }
                }
                let props = schema.get("properties").and_then(Value::as_object);
                for (k, x) in m {
                    let here = format!("{at}.{k}");
                    match props.and_then(|p| p.get(k)) {
                        Some(sub) => self.check_inner(sub, x, &here, errs, true),
                        None => match schema.get("additionalProperties") {
                            Some(Value::Bool(false)) => {
                                errs.push(format!("{here}: property not allowed"));
                            }
                            Some(sub @ Value::Object(_)) => {
                                self.check_inner(sub, x, &here, errs, true);
                            }
                            _ => {}
                        },
                    }
                }
                if strict && let Some(known) = self.declared(schema) {
                    for k in m.keys().filter(|k| !known.contains(k.as_str())) {
                        errs.push(format!("{at}.{k}: property not in the documented schema"));
                    }
                }
            }
            Value::Array(a) => {
                if let Some(items) = schema.get("items") {
                    for (i, x) in a.iter().enumerate() {
                        self.check_inner(items, x, &format!("{at}[{i}]"), errs, true);
                    }
                }
            }
            _ => {}
        }
    }

    /// The property names a closed object schema declares (through `allOf`); None
    /// when it declares none or accepts any (`additionalProperties` given).
    fn declared(&self, schema: &Value) -> Option<HashSet<String>> {
        fn walk(spec: &Spec, s: &Value, names: &mut HashSet<String>) -> (bool, bool) {
            let s = spec.resolve(s);
            let mut saw = false;
            let mut open = s
                .get("additionalProperties")
                .is_some_and(|a| a != &Value::Bool(false));
            if let Some(p) = s.get("properties").and_then(Value::as_object) {
                saw = true;
                names.extend(p.keys().cloned());
            }
            for part in s
                .get("allOf")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let (sw, op) = walk(spec, part, names);
                saw |= sw;
                open |= op;
            }
            (saw, open)
        }
        let mut names = HashSet::new();
        let (saw, open) = walk(self, schema, &mut names);
        (saw && !open).then_some(names)
    }
}

/// Whether `v` is of JSON Schema type `t`.
pub fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => panic!("unknown type {t:?}"),
    }
}

/// A value shortened for an error message.
pub fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        format!(
            "{}...",
            &s[..s.char_indices().nth(117).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}
