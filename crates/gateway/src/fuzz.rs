//! Entry points for the fuzz targets in `fuzz/` (feature `fuzz`, not part
//! of the API): each takes arbitrary bytes and must never panic, hang or
//! allocate without bound, whatever they are.

use http::header::{self, HeaderMap, HeaderValue};

use crate::auth::Auth;
use crate::route::compile::{self, Resolved};
use crate::route::model::{AuthConfig, JwtConfig, RouteSet};

/// A route document as `meshwork gateway apply` reads it: parsed, then
/// compiled with nothing resolved (no DNS, no files), then printed back.
pub fn route_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = RouteSet::from_toml(text) else {
        return;
    };
    let _ = compile::plan(&set, &Resolved::default());
    if let Ok(again) = set.to_toml() {
        // What we print, we read back.
        if let Err(e) = RouteSet::from_toml(&again) {
            panic!("the printed route set does not parse: {e}\n{again}");
        }
    }
}

/// An `Authorization` header against a route's JWT (HS256) and API-key
/// checks.
pub fn jwt_header(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let cfg = AuthConfig {
        jwt: Some(JwtConfig {
            secret: Some("fuzz-secret".into()),
            ..JwtConfig::default()
        }),
        api_keys: None,
    };
    let Ok(auth) = Auth::compile(&cfg, &Resolved::default()) else {
        panic!("the fuzz target's own auth settings do not compile");
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, value.clone());
    let _ = auth.check(&mut headers);
    let mut headers = HeaderMap::new();
    if let Ok(bearer) = HeaderValue::from_bytes(&[b"Bearer ", value.as_bytes()].concat()) {
        headers.insert(header::AUTHORIZATION, bearer);
        let _ = auth.check(&mut headers);
    }
}
