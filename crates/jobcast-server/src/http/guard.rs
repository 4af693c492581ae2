//! The route guard: every route declares what it needs ([`Need`]) where it
//! is defined (see `super::Routes`), and this middleware checks it before
//! the handler runs and before any body is read. Token verification itself
//! is `crate::auth`'s, which knows no HTTP.

use std::borrow::Cow;

use axum::extract::{RawPathParams, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

use super::{ApiError, AppState};
use crate::auth::{Auth, AuthError, Grant, TokenSource};

/// What a route needs; each route states one where it is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: health checks and static files.
    Public,
    /// A valid token (e.g. the stream list, filtered by its patterns).
    Token,
    /// Subscribe on the path's stream (`{id}`).
    Subscribe,
    /// Publish on the path's stream (`{id}`), with a Bearer token.
    Publish,
    /// Cancel on the path's stream (`{id}`): publish, or the claim's
    /// `cancel` patterns, with a Bearer token.
    Cancel,
    /// The `metrics` claim.
    Metrics,
}

/// The guard's state: the app's, and what the guarded route needs.
#[derive(Debug, Clone)]
pub(super) struct Guarded {
    pub(super) state: AppState,
    pub(super) need: Need,
}

/// The middleware: verifies the token the route needs and puts the
/// [`Grant`] into the request's extensions. Runs after routing, so the
/// stream id is the percent-decoded path parameter the handler sees.
pub(super) async fn guard(
    State(Guarded { state, need }): State<Guarded>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(auth) = state.config.auth.as_ref() else {
        req.extensions_mut().insert(Grant::all());
        return next.run(req).await;
    };
    if let Need::Public = need {
        return next.run(req).await;
    }
    let grant = match authenticate(auth, &state, &req) {
        Ok(g) => g,
        Err(e) => return unauthorized(e),
    };
    let stream = params.ok().and_then(|p| {
        p.iter()
            .find(|(k, _)| *k == "id")
            .map(|(_, v)| v.to_owned())
    });
    let allowed = match need {
        Need::Public | Need::Token => true,
        Need::Metrics => grant.may_read_metrics(),
        Need::Subscribe => stream.is_some_and(|s| grant.may_subscribe(&s)),
        Need::Publish if grant.source != TokenSource::Bearer => {
            return unauthorized(AuthError::BearerRequired)
        }
        Need::Publish => stream.is_some_and(|s| grant.may_publish(&s)),
        Need::Cancel if grant.source != TokenSource::Bearer => {
            return unauthorized(AuthError::BearerRequired)
        }
        Need::Cancel => stream.is_some_and(|s| grant.may_cancel(&s)),
    };
    if !allowed {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token does not cover this stream",
        )
        .into_response();
    }
    req.extensions_mut().insert(grant);
    next.run(req).await
}

fn authenticate(auth: &Auth, state: &AppState, req: &Request) -> Result<Grant, AuthError> {
    let (token, source) = token_of(
        req.method(),
        req.headers(),
        req.uri().query(),
        &state.config.auth_cookie,
    )?
    .ok_or(AuthError::Missing)?;
    auth.verify(&token, source)
}

fn unauthorized(e: AuthError) -> Response {
    let challenge = match e {
        AuthError::Missing | AuthError::BearerRequired => r#"Bearer realm="jobcast""#,
        _ => r#"Bearer realm="jobcast", error="invalid_token""#,
    };
    let mut res = ApiError::from(e).into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    res
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        let code = match e {
            AuthError::Missing => "unauthorized",
            AuthError::Invalid => "token_invalid",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::BearerRequired => "bearer_required",
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string())
    }
}

/// The token of a request and where it came from: `Authorization: Bearer`
/// first, then the cookie, then `?access_token=` (on GET and HEAD only).
/// `Err(Invalid)` for an `Authorization` header that is not a Bearer token.
pub(crate) fn token_of<'a>(
    method: &Method,
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    cookie: &str,
) -> Result<Option<(Cow<'a, str>, TokenSource)>, AuthError> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| AuthError::Invalid)?;
        let (scheme, token) = v.trim().split_once(' ').ok_or(AuthError::Invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(AuthError::Invalid);
        }
        return Ok(Some((token.trim().into(), TokenSource::Bearer)));
    }
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for pair in v.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=') {
                if name.trim() == cookie && !value.trim().is_empty() {
                    return Ok(Some((
                        value.trim().trim_matches('"').into(),
                        TokenSource::Cookie,
                    )));
                }
            }
        }
    }
    if *method == Method::GET || *method == Method::HEAD {
        for pair in query.unwrap_or("").split('&') {
            if let Some(v) = pair.strip_prefix("access_token=") {
                if !v.is_empty() {
                    // Tokens are base64url and dots: no percent-decoding needed,
                    // but a client that encoded anything is answered honestly.
                    let v = percent_decode(v).ok_or(AuthError::Invalid)?;
                    return Ok(Some((v, TokenSource::Query)));
                }
            }
        }
    }
    Ok(None)
}

fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') && !s.contains('+') {
        return Some(s.into());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_bearer_then_cookie_then_query() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; jobcast_token=c.c.c"),
        );
        let got = token_of(
            &Method::GET,
            &h,
            Some("access_token=q.q.q"),
            "jobcast_token",
        )
        .unwrap();
        assert_eq!(got, Some(("c.c.c".into(), TokenSource::Cookie)));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer b.b.b"),
        );
        let got = token_of(&Method::GET, &h, None, "jobcast_token").unwrap();
        assert_eq!(got, Some(("b.b.b".into(), TokenSource::Bearer)));
        let none = HeaderMap::new();
        let got = token_of(&Method::GET, &none, Some("x=1&access_token=q.q.q"), "t").unwrap();
        assert_eq!(got, Some(("q.q.q".into(), TokenSource::Query)));
        // Not on a write.
        let got = token_of(&Method::POST, &none, Some("access_token=q.q.q"), "t").unwrap();
        assert_eq!(got, None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9v"),
        );
        assert_eq!(
            token_of(&Method::GET, &h, None, "t"),
            Err(AuthError::Invalid)
        );
    }
}
