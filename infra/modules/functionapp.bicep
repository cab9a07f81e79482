// The Function App: Linux, Python 3.11, Flex Consumption (FC1). Flex always runs from a package:
// the zip published with `az functionapp deployment source config-zip` lands in the storage
// container below, which the app reads with the managed identity. There is no
// WEBSITE_RUN_FROM_PACKAGE, FUNCTIONS_WORKER_RUNTIME or FUNCTIONS_EXTENSION_VERSION setting on Flex:
// the runtime is declared in functionAppConfig.runtime instead.
param name string
param planName string
param location string
param tags object = {}

param identityId string
param identityClientId string
param deploymentContainerUrl string
param tableEndpoint string
@description('The storage account queue endpoint (enrolment jobs).')
param queueEndpoint string
@description('The storage account\'s blob endpoint (the Functions host storage, by identity).')
param blobEndpoint string
param appInsightsConnectionString string

param tenantIds array
param issuerTemplate string
param apiClientId string
param apiAppIdUri string
param apiScope string
param cliClientId string
param tableName string
param keyvaultUrl string
param caKeyKind string
param maxTtlCeiling int
param backdateSeconds int
@description('Scopes whose VMs may be enrolled (resource group or subscription ids).')
param enrolScopes array = []
@description('Public base URL of the API when it differs from the app host name (custom domain). Empty: https://$WEBSITE_HOSTNAME.')
param publicUrl string = ''
@description('Verified domains per tenant for {username}: <tenant id>=contoso.com,contoso.net;<tenant id>=...')
param verifiedDomains string = ''
@description('Host namespaces per tenant: <tenant id>=*.contoso.internal,10.20.0.0/16;<tenant id>=...')
param hostNamespaces string = ''
@description('Pending access requests one user may have open per policy.')
param maxPendingRequests int = 5
@description('Access requests one user may make per minute on one instance.')
param requestRate int = 30
@description('Seconds between leaver sweeps (0: off).')
param leaverIntervalSeconds int = 300
@description('none, low, medium or high: revoke users Entra ID Protection rates this risky or more.')
param leaverRiskLevel string = 'none'

param maximumInstanceCount int = 40
param instanceMemoryMB int = 2048
@description('Microsoft Graph root of this cloud (main.bicep derives it; never the retired Azure AD Graph, environment().graph).')
param graphEndpoint string

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true // Linux
  }
}

// Every setting functions/settings.py reads in Azure, plus the host's identity-based storage
// connection and telemetry. tests/deploy/test_parity.py keeps this list and SETTINGS in step.
var appSettings = [
  // Functions host storage, by identity (no AccountKey anywhere), named by its service URIs: the
  // account name alone makes the host assume the global cloud's core.windows.net suffix, which is
  // wrong in sovereign clouds; the URIs come from the account itself.
  {
    name: 'AzureWebJobsStorage__blobServiceUri'
    value: blobEndpoint
  }
  {
    name: 'AzureWebJobsStorage__queueServiceUri'
    value: queueEndpoint
  }
  {
    name: 'AzureWebJobsStorage__tableServiceUri'
    value: tableEndpoint
  }
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identityClientId
  }
  // Telemetry: the connection string locates the resource; the identity authenticates.
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: appInsightsConnectionString
  }
  {
    name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
    value: 'ClientId=${identityClientId};Authorization=AAD'
  }
  // DefaultAzureCredential picks the user-assigned identity by this id.
  {
    name: 'AZURE_CLIENT_ID'
    value: identityClientId
  }
  // Sign-in.
  {
    name: 'EZSSH_TENANTS'
    value: join(tenantIds, ',')
  }
  {
    name: 'EZSSH_ISSUER_TEMPLATE'
    value: issuerTemplate
  }
  {
    name: 'EZSSH_API_CLIENT_ID'
    value: apiClientId
  }
  {
    name: 'EZSSH_API_APP_ID_URI'
    value: apiAppIdUri
  }
  {
    name: 'EZSSH_API_SCOPE'
    value: apiScope
  }
  {
    name: 'EZSSH_CLI_CLIENT_ID'
    value: cliClientId
  }
  // State: Table Storage through the account URL and the managed identity.
  {
    name: 'EZSSH_STORAGE_ACCOUNT_URL'
    value: tableEndpoint
  }
  {
    name: 'EZSSH_TABLE_NAME'
    value: tableName
  }
  // Enrolment jobs: the queue the API, Event Grid and the timer write to (the host's queue trigger
  // reads it through AzureWebJobsStorage, the same account and identity).
  {
    name: 'EZSSH_QUEUE_ACCOUNT_URL'
    value: queueEndpoint
  }
  // CA keys: Key Vault (or Managed HSM) through the managed identity.
  {
    name: 'EZSSH_SIGNER_BACKEND'
    value: 'keyvault'
  }
  {
    name: 'EZSSH_KEYVAULT_URL'
    value: keyvaultUrl
  }
  {
    name: 'EZSSH_CA_KEY_KIND'
    value: caKeyKind
  }
  // Certificate limits.
  {
    name: 'EZSSH_MAX_TTL_CEILING'
    value: string(maxTtlCeiling)
  }
  {
    name: 'EZSSH_BACKDATE_SECONDS'
    value: string(backdateSeconds)
  }
  // Hosts: where VMs may be enrolled, the ARM endpoint of this cloud, and the URL pushed scripts
  // fetch KRLs from (empty: the service uses https://$WEBSITE_HOSTNAME).
  {
    name: 'EZSSH_ENROL_SCOPES'
    value: join(enrolScopes, ',')
  }
  {
    name: 'EZSSH_ARM_ENDPOINT'
    value: environment().resourceManager
  }
  {
    name: 'EZSSH_PUBLIC_URL'
    value: publicUrl
  }
  {
    name: 'EZSSH_VM_HOST_CERTS'
    value: 'on'
  }
  {
    name: 'EZSSH_GRAPH_ENDPOINT'
    value: graphEndpoint
  }
  // Who may log in as whom, and how much one user may ask.
  {
    name: 'EZSSH_VERIFIED_DOMAINS'
    value: verifiedDomains
  }
  // Where the tenants' hosts live: host certificates name only hosts inside these.
  {
    name: 'EZSSH_HOST_NAMESPACES'
    value: hostNamespaces
  }
  {
    name: 'EZSSH_MAX_PENDING_REQUESTS'
    value: string(maxPendingRequests)
  }
  {
    name: 'EZSSH_REQUEST_RATE'
    value: string(requestRate)
  }
  // People and apps who may no longer sign in lose their certificates (the revoke_leavers timer).
  {
    name: 'EZSSH_LEAVER_INTERVAL'
    value: string(leaverIntervalSeconds)
  }
  {
    name: 'EZSSH_LEAVER_RISK_LEVEL'
    value: leaverRiskLevel
  }
]

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    siteConfig: {
      minTlsVersion: '1.2'
      appSettings: appSettings
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// Publishing goes through Entra ID (az login), never through basic-auth publishing credentials.
resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

output id string = site.id
output name string = site.name
output defaultHostName string = site.properties.defaultHostName
