// Package userassign assigns a request that names its user (a header) to one child of Traefik's
// weighted service, by a consistent hash of the user id against the current weights.
//
// It does not proxy anything itself: it writes the weighted service's sticky cookie into the request,
// naming the child the user is assigned to, so the weighted service (Traefik's own splitter) sends it
// there. The arms are laid out on [0, 10000) in the order given, each taking a run of buckets as long
// as its share of the total weight. Listing the canary last and the control first, a canary that gains
// weight from the baseline takes buckets only from the baseline's end: its users never leave it, and
// at weight 0 every one of them is back on the baseline. Requests without the header pass untouched
// (the weighted split, or a browser's own sticky cookie).
package userassign

import (
	"context"
	"fmt"
	"net/http"
	"net/textproto"
)

// Buckets is the resolution of the layout: a weight share is placed to 1/10000.
const Buckets = 10000

// Arm is one child of the weighted service: the sticky-cookie value Traefik gives it and its weight.
type Arm struct {
	Cookie string `json:"cookie,omitempty"`
	Weight int    `json:"weight,omitempty"`
}

// Config is the middleware's dynamic configuration, rewritten with the weighted service's weights.
type Config struct {
	Header     string `json:"header,omitempty"`
	CookieName string `json:"cookieName,omitempty"`
	Seed       string `json:"seed,omitempty"`
	Arms       []Arm  `json:"arms,omitempty"`
}

// CreateConfig returns the defaults.
func CreateConfig() *Config {
	return &Config{Header: "X-User-Id", CookieName: "recsys_arm"}
}

const (
	offset64 = 14695981039346656037
	prime64  = 1099511628211
)

// Assign is the middleware. Everything a request needs is computed here once: Yaegi interprets
// ServeHTTP, so each operation there costs, and calls into compiled packages cost the most.
type Assign struct {
	next    http.Handler
	header  string   // canonical form, for a direct map read
	start   uint64   // FNV-1a state after the seed
	bounds  []uint64 // upper bucket bound of each arm with weight
	cookies []string // "name=value" of each arm's sticky cookie
	lines   [][]string
}

// New checks the configuration and precomputes each arm's upper bucket bound.
func New(ctx context.Context, next http.Handler, config *Config, name string) (http.Handler, error) {
	if config.Header == "" || config.CookieName == "" {
		return nil, fmt.Errorf("%s: header and cookieName must be set", name)
	}
	total := 0
	for _, arm := range config.Arms {
		if arm.Weight < 0 {
			return nil, fmt.Errorf("%s: arm %q has a negative weight", name, arm.Cookie)
		}
		total += arm.Weight
	}
	a := &Assign{next: next, header: textproto.CanonicalMIMEHeaderKey(config.Header), start: fnv1a(offset64, config.Seed)}
	if total == 0 {
		return a, nil
	}
	cumulative := 0
	for _, arm := range config.Arms {
		if arm.Weight == 0 {
			continue
		}
		cumulative += arm.Weight
		a.bounds = append(a.bounds, uint64(cumulative*Buckets/total))
		a.cookies = append(a.cookies, config.CookieName+"="+arm.Cookie)
		a.lines = append(a.lines, []string{config.CookieName + "=" + arm.Cookie})
	}
	return a, nil
}

func fnv1a(h uint64, s string) uint64 {
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= prime64
	}
	return h
}

// Bucket is the user's place on [0, Buckets): FNV-1a 64 of the seed and the user id.
func Bucket(seed, user string) uint64 {
	return fnv1a(fnv1a(offset64, seed), user) % Buckets
}

func (a *Assign) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	values := req.Header[a.header]
	if len(values) > 0 && len(a.bounds) > 0 {
		b := fnv1a(a.start, values[0]) % Buckets
		for i, bound := range a.bounds {
			if b < bound {
				// First in line: Go's Request.Cookie returns the first cookie of a name, so the
				// assignment beats any sticky cookie the client sent. Without cookies, the shared
				// one-line slice (read, never written, by the weighted service and the proxy).
				if old := req.Header["Cookie"]; len(old) > 0 {
					req.Header["Cookie"] = append([]string{a.cookies[i]}, old...)
				} else {
					req.Header["Cookie"] = a.lines[i]
				}
				break
			}
		}
	}
	a.next.ServeHTTP(rw, req)
}
