// agentload: the benchmark's native load generator.
//
// It drives a CA the way a fleet of agents does, on the client stack
// istio-agent itself uses (grpc-go): one TLS connection per agent, one call
// in flight on each, a bearer token of its own, distinct pre-encoded
// requests. It exists because the Python generator spends ~290 µs of CPU per
// call on the same two cores as the server it measures; this one spends a
// fraction of that, so the server gets the machine.
//
// Protocol with its driver (bench/native_load.py): the configuration is a
// JSON file named on the command line; requests come from a file of
// length-prefixed records (4-byte big-endian length, then the bytes: an
// encoded IstioCertificateRequest, or a cfssl JSON body). When every
// connection is up it prints "ready" on stdout and waits for a line on stdin;
// that line starts the clock. At the end it prints one JSON report.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/ioutil"
	"net/http"
	"os"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type config struct {
	Kind         string   `json:"kind"` // "istio" or "cfssl"
	Address      string   `json:"address"`
	RootPEMFile  string   `json:"root_pem_file"`
	ServerName   string   `json:"server_name"`
	Method       string   `json:"method"`
	RequestsFile string   `json:"requests_file"`
	Tokens       []string `json:"tokens"` // one per connection (istio); none: no authorization header
	// A client certificate for every connection (a VM agent's PROV_CERT);
	// empty: none is presented.
	ClientCertFile string  `json:"client_cert_file"`
	ClientKeyFile  string  `json:"client_key_file"`
	ClusterID      string  `json:"cluster_id"`
	Connections    int     `json:"connections"`
	WarmupS        float64 `json:"warmup_s"`
	DurationS      float64 `json:"duration_s"`
	CallTimeoutS   float64 `json:"call_timeout_s"`
	Rate           float64 `json:"rate"` // total calls/s; 0: closed loop
}

type report struct {
	Latencies      []float64      `json:"latencies_s"`
	ErrorLatencies []float64      `json:"error_latencies_s"`
	Errors         map[string]int `json:"errors"`
	CPUS           float64        `json:"cpu_s"`
	// Every success from the first call to the last, warm-up and drain
	// included: what the server's audit log must hold for this run.
	AllOK int `json:"all_ok"`
}

// A connection to the server under test; call returns "" or the failure's code.
type caller interface {
	call(ctx context.Context, request []byte) string
	close()
}

const pauseAfterError = 10 * time.Millisecond

var codeNames = map[codes.Code]string{
	codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN", codes.InvalidArgument: "INVALID_ARGUMENT",
	codes.DeadlineExceeded: "DEADLINE_EXCEEDED", codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED", codes.OutOfRange: "OUT_OF_RANGE",
	codes.Unimplemented: "UNIMPLEMENTED", codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE",
	codes.DataLoss: "DATA_LOSS", codes.Unauthenticated: "UNAUTHENTICATED",
}

// rawCodec sends the pre-encoded request bytes as they are and hands back the
// response bytes undecoded: the generator spends nothing on protobuf.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append((*(v.(*[]byte)))[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

type istioCaller struct {
	conn   *grpc.ClientConn
	method string
	header metadata.MD
	reply  []byte
}

func (c *istioCaller) call(ctx context.Context, request []byte) string {
	ctx = metadata.NewOutgoingContext(ctx, c.header)
	if err := c.conn.Invoke(ctx, c.method, &request, &c.reply, grpc.ForceCodec(rawCodec{})); err != nil {
		if name, ok := codeNames[status.Code(err)]; ok {
			return name
		}
		return "CLIENT_ERROR"
	}
	return checkChain(c.reply)
}

func (c *istioCaller) close() { c.conn.Close() }

// checkChain: the reply must carry a certificate chain (field 1, repeated
// string), leaf first, each entry a PEM certificate.
func checkChain(reply []byte) string {
	entries := 0
	for len(reply) > 0 {
		key, n := binary.Uvarint(reply)
		if n <= 0 {
			return "BAD_RESPONSE"
		}
		reply = reply[n:]
		if key&7 != 2 {
			return "BAD_RESPONSE"
		}
		size, m := binary.Uvarint(reply)
		if m <= 0 || uint64(len(reply)-m) < size {
			return "BAD_RESPONSE"
		}
		value := reply[m : m+int(size)]
		reply = reply[m+int(size):]
		if key>>3 == 1 {
			if !bytes.HasPrefix(value, []byte("-----BEGIN CERTIFICATE-----")) {
				return "BAD_RESPONSE"
			}
			entries++
		}
	}
	if entries < 2 {
		return "EMPTY_CHAIN"
	}
	return ""
}

type cfsslCaller struct {
	client *http.Client
	url    string
}

func (c *cfsslCaller) call(ctx context.Context, request []byte) string {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(request))
	if err != nil {
		return "CLIENT_ERROR"
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.client.Do(req)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return "DEADLINE_EXCEEDED"
		}
		return "CLIENT_ERROR"
	}
	body, err := ioutil.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return "CLIENT_ERROR"
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Sprintf("HTTP_%d", resp.StatusCode)
	}
	if !bytes.Contains(body, []byte(`"success":true`)) {
		return "NOT_SUCCESS"
	}
	return ""
}

func (c *cfsslCaller) close() { c.client.CloseIdleConnections() }

func connect(cfg *config, index int, roots *x509.CertPool) (caller, error) {
	switch cfg.Kind {
	case "istio":
		tlsConfig := &tls.Config{RootCAs: roots, ServerName: cfg.ServerName}
		if cfg.ClientCertFile != "" {
			pair, err := tls.LoadX509KeyPair(cfg.ClientCertFile, cfg.ClientKeyFile)
			if err != nil {
				return nil, err
			}
			tlsConfig.Certificates = []tls.Certificate{pair}
		}
		creds := credentials.NewTLS(tlsConfig)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// Each ClientConn dials its own TCP connection and TLS session.
		conn, err := grpc.DialContext(ctx, cfg.Address, grpc.WithTransportCredentials(creds), grpc.WithBlock(),
			grpc.WithReturnConnectionError())
		if err != nil {
			return nil, err
		}
		header := metadata.Pairs("clusterid", cfg.ClusterID)
		if len(cfg.Tokens) > 0 {
			header.Set("authorization", "Bearer "+cfg.Tokens[index%len(cfg.Tokens)])
		}
		return &istioCaller{conn: conn, method: cfg.Method, header: header}, nil
	case "cfssl":
		transport := &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1, DisableCompression: true}
		return &cfsslCaller{client: &http.Client{Transport: transport}, url: "http://" + cfg.Address + cfg.Method}, nil
	}
	return nil, fmt.Errorf("kind %q: istio or cfssl", cfg.Kind)
}

func readRequests(path string) ([][]byte, error) {
	data, err := ioutil.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for len(data) > 0 {
		if len(data) < 4 {
			return nil, errors.New("truncated length prefix")
		}
		size := int(binary.BigEndian.Uint32(data))
		if len(data)-4 < size {
			return nil, errors.New("truncated record")
		}
		out = append(out, data[4:4+size])
		data = data[4+size:]
	}
	if len(out) == 0 {
		return nil, errors.New("no requests")
	}
	return out, nil
}

func cpuSeconds() float64 {
	var usage syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	return float64(usage.Utime.Nano()+usage.Stime.Nano()) / 1e9
}

type window struct {
	start, end time.Time
	mu         sync.Mutex
	out        report
}

func (w *window) record(done time.Time, latency, serviceLatency time.Duration, code string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if code == "" {
		w.out.AllOK++
	}
	if done.Before(w.start) || !done.Before(w.end) {
		return
	}
	if code == "" {
		w.out.Latencies = append(w.out.Latencies, latency.Seconds())
	} else {
		w.out.Errors[code]++
		w.out.ErrorLatencies = append(w.out.ErrorLatencies, serviceLatency.Seconds())
	}
}

// drive runs one connection: one call in flight until the window closes.
// Paced, a call's latency counts from its scheduled send (no coordinated
// omission); a refusal's from its actual send.
func drive(c caller, requests [][]byte, first, stride int, w *window, timeout time.Duration,
	phase time.Time, interval time.Duration) {
	index := first
	for sent := 0; ; sent++ {
		now := time.Now()
		if !now.Before(w.end) {
			return
		}
		began := now
		if interval > 0 {
			began = phase.Add(time.Duration(sent) * interval)
			if began.After(now) {
				time.Sleep(began.Sub(now))
			}
		}
		sentAt := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		code := c.call(ctx, requests[index%len(requests)])
		cancel()
		done := time.Now()
		w.record(done, done.Sub(began), done.Sub(sentAt), code)
		index += stride
		if code != "" {
			time.Sleep(pauseAfterError)
		}
	}
}

func run(cfg *config) (*report, error) {
	requests, err := readRequests(cfg.RequestsFile)
	if err != nil {
		return nil, fmt.Errorf("requests: %w", err)
	}
	var roots *x509.CertPool
	if cfg.Kind == "istio" {
		pem, err := ioutil.ReadFile(cfg.RootPEMFile)
		if err != nil {
			return nil, err
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, errors.New("no certificate in the root bundle")
		}
		if len(cfg.Tokens) > 0 && len(cfg.Tokens) < cfg.Connections {
			return nil, fmt.Errorf("%d tokens for %d connections", len(cfg.Tokens), cfg.Connections)
		}
	}
	callers := make([]caller, cfg.Connections)
	for i := range callers {
		if callers[i], err = connect(cfg, i, roots); err != nil {
			return nil, fmt.Errorf("connection %d: %w", i, err)
		}
	}
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil && err != io.EOF {
		return nil, err
	}
	startAt := time.Now()
	warmup := time.Duration(cfg.WarmupS * float64(time.Second))
	duration := time.Duration(cfg.DurationS * float64(time.Second))
	w := &window{start: startAt.Add(warmup), end: startAt.Add(warmup + duration)}
	w.out.Errors = map[string]int{}
	timeout := time.Duration(cfg.CallTimeoutS * float64(time.Second))
	var interval time.Duration
	if cfg.Rate > 0 {
		interval = time.Duration(float64(cfg.Connections) / cfg.Rate * float64(time.Second))
	}

	cpu := make(chan float64, 1)
	go func() {
		time.Sleep(time.Until(w.start))
		before := cpuSeconds()
		time.Sleep(time.Until(w.end))
		cpu <- cpuSeconds() - before
	}()
	var wg sync.WaitGroup
	for i, c := range callers {
		wg.Add(1)
		// Every connection on its own schedule, staggered across the interval.
		phase := startAt.Add(time.Duration(float64(interval) * float64(i) / float64(cfg.Connections)))
		go func(i int, c caller, phase time.Time) {
			defer wg.Done()
			drive(c, requests, i, len(callers), w, timeout, phase, interval)
		}(i, c, phase)
	}
	w.out.CPUS = <-cpu
	wg.Wait()
	for _, c := range callers {
		c.close()
	}
	return &w.out, nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: agentload CONFIG.json")
		os.Exit(2)
	}
	raw, err := ioutil.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var cfg config
	if err := json.Unmarshal(raw, &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "config:", err)
		os.Exit(2)
	}
	out, err := run(&cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agentload:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
