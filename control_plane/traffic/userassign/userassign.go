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
//
// Configured with `pairHeader` instead, the same plugin gives every request a fresh pair key in that
// header (16 random bytes, hex), replacing any the client sent. It is attached only to the gateway's
// routers during a shadow phase, before Traefik's mirror copies the request, so the baseline's answer
// and the shadow's copy log the same key and can be joined.
package userassign

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"hash/crc32"
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
	PairHeader string `json:"pairHeader,omitempty"` // set: the pair-key mode, nothing else is read
}

// CreateConfig returns the defaults.
func CreateConfig() *Config {
	return &Config{Header: "X-User-Id", CookieName: "recsys_arm"}
}

// Assign is the middleware. Everything a request needs is computed here once: Yaegi interprets
// ServeHTTP, so each operation there costs, and calls into compiled packages cost the most.
type Assign struct {
	next    http.Handler
	header  string     // canonical form, for a direct map read
	start   uint32     // the CRC-32 of the seed, continued by each user id
	arm     []int      // bucket -> arm, for every bucket
	cookies []string   // "name=value" of each arm's sticky cookie
	lines   [][]string // the same, each as a Cookie header of one line
}

// Pair is the pair-key mode's middleware.
type Pair struct {
	next   http.Handler
	header string // canonical form, for a direct map write
}

func (p *Pair) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	var key [16]byte
	if _, err := rand.Read(key[:]); err == nil {
		req.Header[p.header] = []string{hex.EncodeToString(key[:])}
	} else {
		delete(req.Header, p.header) // no key rather than a shared one
	}
	p.next.ServeHTTP(rw, req)
}

// New checks the configuration and precomputes each arm's upper bucket bound.
func New(ctx context.Context, next http.Handler, config *Config, name string) (http.Handler, error) {
	if config.PairHeader != "" {
		return &Pair{next: next, header: textproto.CanonicalMIMEHeaderKey(config.PairHeader)}, nil
	}
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
	a := &Assign{
		next:   next,
		header: textproto.CanonicalMIMEHeaderKey(config.Header),
		start:  crc32.ChecksumIEEE([]byte(config.Seed)),
	}
	if total == 0 {
		return a, nil
	}
	a.arm = make([]int, Buckets)
	cumulative, lower := 0, 0
	for _, arm := range config.Arms {
		if arm.Weight == 0 {
			continue
		}
		cumulative += arm.Weight
		upper := cumulative * Buckets / total
		for b := lower; b < upper; b++ {
			a.arm[b] = len(a.cookies)
		}
		lower = upper
		a.cookies = append(a.cookies, config.CookieName+"="+arm.Cookie)
		a.lines = append(a.lines, []string{config.CookieName + "=" + arm.Cookie})
	}
	return a, nil
}

// Bucket is the user's place on [0, Buckets): the CRC-32 (IEEE) of the seed followed by the user id.
// One call into compiled code: an interpreted hash loop cost more than the rest of the middleware.
func Bucket(start uint32, user string) int {
	return int(crc32.Update(start, crc32.IEEETable, []byte(user)) % Buckets)
}

func (a *Assign) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	values := req.Header[a.header]
	if len(values) > 0 && a.arm != nil {
		i := a.arm[Bucket(a.start, values[0])]
		// First in line: Go's Request.Cookie returns the first cookie of a name, so the assignment
		// beats any sticky cookie the client sent. Without cookies, the shared one-line slice (read,
		// never written, by the weighted service and the proxy).
		if old := req.Header["Cookie"]; len(old) > 0 {
			req.Header["Cookie"] = append([]string{a.cookies[i]}, old...)
		} else {
			req.Header["Cookie"] = a.lines[i]
		}
	}
	a.next.ServeHTTP(rw, req)
}
