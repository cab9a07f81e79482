// The Event Grid system topic for this resource group's subscription (a system topic is a
// resource-group resource with location 'global' whose source is the subscription). A source may have
// only one system topic, so main.bicep deploys this only when no existing topic is named
// (existingVmEventsTopicName); otherwise events.bicep subscribes on the existing one.
param topicName string
param tags object = {}

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: topicName
  location: 'global'
  tags: tags
  properties: {
    source: subscription().id
    topicType: 'Microsoft.Resources.Subscriptions'
  }
}

output topicId string = topic.id
output topicName string = topic.name
