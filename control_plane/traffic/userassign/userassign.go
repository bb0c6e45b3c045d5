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
	"hash/fnv"
	"net/http"
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

// Assign is the middleware.
type Assign struct {
	next    http.Handler
	header  string
	prefix  string
	seed    []byte
	bounds  []uint64
	cookies []string
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
	a := &Assign{next: next, header: config.Header, prefix: config.CookieName + "=", seed: []byte(config.Seed)}
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
	}
	return a, nil
}

// Bucket is the user's place on [0, Buckets): FNV-1a 64 of the seed and the user id.
func Bucket(seed []byte, user string) uint64 {
	h := fnv.New64a()
	h.Write(seed)
	h.Write([]byte(user))
	return h.Sum64() % Buckets
}

func (a *Assign) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	user := req.Header.Get(a.header)
	if user != "" && len(a.bounds) > 0 {
		b := Bucket(a.seed, user)
		for i, bound := range a.bounds {
			if b < bound {
				// First in line: Go's Request.Cookie returns the first cookie of a name, so the
				// assignment beats any sticky cookie the client sent.
				req.Header["Cookie"] = append([]string{a.cookies[i]}, req.Header["Cookie"]...)
				break
			}
		}
	}
	a.next.ServeHTTP(rw, req)
}
