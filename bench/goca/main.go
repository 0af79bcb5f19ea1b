// goca: the benchmark's peer, a CA built the way istiod's CA is built.
//
// grpc-go over TLS with tls.VerifyClientCertIfGiven (istiod's port 15012),
// IstioCertificateService/CreateCertificate, the CSR parsed and its
// signature checked by crypto/x509, the leaf made by x509.CreateCertificate
// with the CA key in memory: what istiod's CA does per certificate, without
// an HSM, an audit log or a batch. Authentication is the client
// certificate's URI SAN, else a bearer token looked up in a table given in
// the configuration (cheaper than istiod's TokenReview: it favours the peer).
//
// Protocol with its driver (bench/go_peer.py): the configuration is a JSON
// file named on the command line; once it listens it prints "ready <port>".
package main

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/ioutil"
	"math/big"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

type config struct {
	Address     string            `json:"address"`
	ServingCert string            `json:"serving_cert_file"`
	ServingKey  string            `json:"serving_key_file"`
	CACert      string            `json:"ca_cert_file"`
	CAKey       string            `json:"ca_key_file"`
	Roots       string            `json:"roots_file"` // the bundle returned last, and client certificates' roots
	Tokens      map[string]string `json:"tokens"`     // bearer token -> SPIFFE ID
	MaxTTL      int64             `json:"max_ttl_seconds"`
}

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string   { return "proto" }
func (rawCodec) String() string { return "proto" }

type ca struct {
	cert    *x509.Certificate
	key     crypto.Signer
	rootPEM string
	tokens  map[string]string
	maxTTL  time.Duration
}

// request: IstioCertificateRequest's csr (1) and validity_duration (3).
func parseRequest(data []byte) (csr string, ttl int64, err error) {
	for len(data) > 0 {
		key, n := binary.Uvarint(data)
		if n <= 0 {
			return "", 0, errors.New("bad tag")
		}
		data = data[n:]
		switch key & 7 {
		case 0:
			value, m := binary.Uvarint(data)
			if m <= 0 {
				return "", 0, errors.New("bad varint")
			}
			data = data[m:]
			if key>>3 == 3 {
				ttl = int64(value)
			}
		case 2:
			size, m := binary.Uvarint(data)
			if m <= 0 || uint64(len(data)-m) < size {
				return "", 0, errors.New("bad length")
			}
			if key>>3 == 1 {
				csr = string(data[m : m+int(size)])
			}
			data = data[m+int(size):]
		default:
			return "", 0, errors.New("unexpected wire type")
		}
	}
	return csr, ttl, nil
}

func appendString(out []byte, field uint64, value string) []byte {
	out = binary.AppendUvarint(out, field<<3|2)
	out = binary.AppendUvarint(out, uint64(len(value)))
	return append(out, value...)
}

var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

func (c *ca) identity(ctx context.Context) (string, error) {
	if p, ok := peer.FromContext(ctx); ok {
		if info, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(info.State.VerifiedChains) > 0 {
			leaf := info.State.VerifiedChains[0][0]
			if len(leaf.URIs) == 1 {
				return leaf.URIs[0].String(), nil
			}
			return "", status.Error(codes.Unauthenticated, "request authenticate failure")
		}
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for _, value := range md.Get("authorization") {
		if strings.HasPrefix(value, "Bearer ") {
			if id, ok := c.tokens[strings.TrimPrefix(value, "Bearer ")]; ok {
				return id, nil
			}
		}
	}
	return "", status.Error(codes.Unauthenticated, "request authenticate failure")
}

func (c *ca) sign(ctx context.Context, request []byte) ([]byte, error) {
	id, err := c.identity(ctx)
	if err != nil {
		return nil, err
	}
	csrPEM, ttlSeconds, err := parseRequest(request)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	block, _ := pem.Decode([]byte(csrPEM))
	if block == nil {
		return nil, status.Error(codes.InvalidArgument, "CSR is not PEM")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	ttl := time.Duration(ttlSeconds) * time.Second
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	if ttl > c.maxTTL {
		return nil, status.Error(codes.InvalidArgument, "requested TTL is greater than the max allowed TTL")
	}
	uri, err := url.Parse(id)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	san, err := asn1.Marshal([]asn1.RawValue{{Tag: 6, Class: asn1.ClassContextSpecific, Bytes: []byte(uri.String())}})
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	now := time.Now()
	notAfter := now.Add(ttl)
	if notAfter.After(c.cert.NotAfter) {
		notAfter = c.cert.NotAfter
	}
	template := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{},
		NotBefore:             now.Add(-2 * time.Minute),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		ExtraExtensions:       []pkix.Extension{{Id: oidSAN, Critical: true, Value: san}},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, c.cert, csr.PublicKey, c.key)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	leaf := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	out := appendString(nil, 1, leaf)
	return appendString(out, 1, c.rootPEM), nil
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "goca: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	if len(os.Args) != 2 {
		fail("usage: goca CONFIG.json")
	}
	raw, err := ioutil.ReadFile(os.Args[1])
	if err != nil {
		fail("%v", err)
	}
	var cfg config
	if err := json.Unmarshal(raw, &cfg); err != nil {
		fail("config: %v", err)
	}
	serving, err := tls.LoadX509KeyPair(cfg.ServingCert, cfg.ServingKey)
	if err != nil {
		fail("serving certificate: %v", err)
	}
	pair, err := tls.LoadX509KeyPair(cfg.CACert, cfg.CAKey)
	if err != nil {
		fail("CA: %v", err)
	}
	caCert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		fail("CA certificate: %v", err)
	}
	rootPEM, err := ioutil.ReadFile(cfg.Roots)
	if err != nil {
		fail("roots: %v", err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(rootPEM)
	authority := &ca{cert: caCert, key: pair.PrivateKey.(crypto.Signer), rootPEM: string(rootPEM), tokens: cfg.Tokens,
		maxTTL: time.Duration(cfg.MaxTTL) * time.Second}
	tlsConfig := &tls.Config{Certificates: []tls.Certificate{serving}, ClientAuth: tls.VerifyClientCertIfGiven,
		ClientCAs: roots, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}}
	server := grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsConfig)), grpc.CustomCodec(rawCodec{}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 15 * time.Second, PermitWithoutStream: true}))
	server.RegisterService(&grpc.ServiceDesc{
		ServiceName: "istio.v1.auth.IstioCertificateService",
		HandlerType: (*interface{})(nil),
		Methods: []grpc.MethodDesc{{MethodName: "CreateCertificate",
			Handler: func(_ interface{}, ctx context.Context, dec func(interface{}) error,
				_ grpc.UnaryServerInterceptor) (interface{}, error) {
				var request []byte
				if err := dec(&request); err != nil {
					return nil, err
				}
				reply, err := authority.sign(ctx, request)
				if err != nil {
					return nil, err
				}
				return &reply, nil
			}}},
	}, struct{}{})
	listener, err := net.Listen("tcp", cfg.Address)
	if err != nil {
		fail("listen: %v", err)
	}
	fmt.Printf("ready %d\n", listener.Addr().(*net.TCPAddr).Port)
	if err := server.Serve(listener); err != nil {
		fail("serve: %v", err)
	}
}
