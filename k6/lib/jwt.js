// Token minting inside k6: HS256 JWTs signed with k6/crypto, the same
// claims `cellgate token` puts in (see PROTOCOL.md "Identities and tokens"),
// plus the broken kinds the handshake storm offers the gateway.
//
// The secret comes from the environment (CG_JWT_SECRET). Against a gateway
// whose tokens come from an identity provider, mint them elsewhere and give
// the scripts a file instead (CG_TOKENS_FILE, see loadTokenFile).

import crypto from 'k6/crypto';
import encoding from 'k6/encoding';

const nowSecs = () => Math.floor(Date.now() / 1000);

function part(value) {
  return encoding.b64encode(JSON.stringify(value), 'rawurl');
}

/** Signs `claims` with HMAC-SHA256; `header` may be overridden for broken tokens. */
export function signHS256(claims, secret, header = { alg: 'HS256', typ: 'JWT' }) {
  const signingInput = `${part(header)}.${part(claims)}`;
  const signature = crypto.hmac('sha256', secret, signingInput, 'base64rawurl');
  return `${signingInput}.${signature}`;
}

/** Mints instructor and student tokens with one secret. */
export class Minter {
  constructor(secret, { ttlSecs = 3600, issuer, audience } = {}) {
    if (!secret) {
      throw new Error('no JWT secret: set CG_JWT_SECRET (or give CG_TOKENS_FILE)');
    }
    this.secret = secret;
    this.ttlSecs = ttlSecs;
    this.issuer = issuer;
    this.audience = audience;
  }

  claims(sub, role, extra = {}) {
    const iat = nowSecs();
    const claims = { sub, role, iat, exp: iat + this.ttlSecs };
    if (this.issuer) claims.iss = this.issuer;
    if (this.audience) claims.aud = this.audience;
    return Object.assign(claims, extra);
  }

  instructor(email, extra = {}) {
    return signHS256(this.claims(email, 'instructor', extra), this.secret);
  }

  student(id, classroom, seat, extra = {}) {
    const claims = this.claims(id, 'student', { classroom, ...extra });
    if (seat !== undefined && seat !== null) claims.seat = seat;
    return signHS256(claims, this.secret);
  }

  /**
   * Tokens the gateway must refuse, each with the `connect_error` code the
   * wire contract promises for it. `email` is an instructor who exists and
   * is active: only the token is wrong.
   */
  invalid(email) {
    const now = nowSecs();
    const good = this.claims(email, 'instructor');
    const unsigned = `${part({ alg: 'none', typ: 'JWT' })}.${part(good)}.`;
    const valid = this.instructor(email);
    // Flip one character of the signature: still base64url, wrong MAC.
    const last = valid.charAt(valid.length - 2) === 'A' ? 'B' : 'A';
    const tampered = valid.slice(0, -2) + last + valid.slice(-1);
    return [
      { kind: 'expired', code: 'token_expired',
        token: signHS256({ ...good, iat: now - 7200, exp: now - 3600 }, this.secret) },
      { kind: 'bad_signature', code: 'invalid_token',
        token: signHS256(good, `${this.secret}-not-the-secret`) },
      { kind: 'tampered', code: 'invalid_token', token: tampered },
      { kind: 'alg_none', code: 'invalid_token', token: unsigned },
      { kind: 'alg_mismatch', code: 'invalid_token',
        token: signHS256(good, this.secret, { alg: 'HS384', typ: 'JWT' }) },
      { kind: 'student_role', code: 'invalid_token',
        token: this.student('s-0001', 'cls-none', 1) },
      { kind: 'not_yet_valid', code: 'invalid_token',
        token: signHS256({ ...good, nbf: now + 3600 }, this.secret) },
      { kind: 'no_exp', code: 'invalid_token',
        token: signHS256({ sub: email, role: 'instructor', iat: now }, this.secret) },
      { kind: 'garbage', code: 'invalid_token', token: 'not-a-jwt' },
      { kind: 'missing', code: 'invalid_token', token: null },
    ];
  }
}

/**
 * Tokens from a JSON file made outside k6 (e.g. with `cellgate token`):
 * `{ "instructors": { email: token }, "students": { id: token } }`.
 * Call in the init context (k6's open()).
 */
export function loadTokenFile(path) {
  const parsed = JSON.parse(open(path));
  return { instructors: parsed.instructors || {}, students: parsed.students || {} };
}
